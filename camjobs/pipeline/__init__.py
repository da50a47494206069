"""The job: listing, decoding, the model actors, localization and the Parquet sink on Ray Data.

Imports Ray and torch (the model stage); the label tools never import this package.
"""
