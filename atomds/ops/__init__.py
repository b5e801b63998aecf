"""xarray layer of atomds: functions that take a Dataset and return a new Dataset.

Dims, coordinates, ``units`` and ``long_name`` attributes are set here; the maths lives in
:mod:`atomds.core`. Submodules are imported lazily by the accessor.
"""
