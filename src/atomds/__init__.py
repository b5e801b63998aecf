"""atomds: local crystallography on xarray Datasets."""
__version__ = "0.1.0"
