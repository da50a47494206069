"""The classifiers (networks: architectures, weights, checkpoints) and their training on Ray Train.

Imports torch; training imports Ray Train too.
"""
