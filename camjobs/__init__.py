"""camjobs: dataset-scale Class Activation Mapping on Ray, written to Parquet."""

__version__ = "0.1.0"
