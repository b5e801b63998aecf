"""Pure NumPy/SciPy/scikit-image/scikit-learn core of atomds.

Nothing in this package imports xarray or dask: functions take arrays and return arrays.
Positions are in pixels (``x`` = column index, ``y`` = row index, pixel centres at integers).
"""
