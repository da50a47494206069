"""The cluster client: submit a run to a Ray cluster's Jobs API and follow it.

Imports Ray's job-submission client only, never torch or the pipeline.
"""
