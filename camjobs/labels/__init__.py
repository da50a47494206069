"""The label tools: evaluate, export, viz and verify, over an output folder that a run wrote.

They need pyarrow, numpy, OpenCV and pycocotools only, never torch or Ray, so that they run
where the labelers are (a test checks what importing each one loads).
"""
