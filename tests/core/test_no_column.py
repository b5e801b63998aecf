"""Seeds on no column (between overlapping columns) are dropped by the joint fit's significance test."""

import numpy as np

from atomds.core.refine import estimate_fit_settings
from atomds.core.refine.residual import refine_and_complete


def _dense_square(seed: int = 0, spacing: float = 7.0, sigma: float = 2.0, counts: float = 4000.0):
    """A square lattice of overlapping columns (spacing 3.5 widths), Poisson noise; positions px."""
    rng = np.random.default_rng(seed)
    g = np.arange(6.0, 90.0, spacing)
    x, y = (v.ravel() for v in np.meshgrid(g, g))
    yy, xx = np.mgrid[0:96, 0:96].astype(float)
    mu = np.full(xx.shape, 20.0)
    for cx, cy in zip(x, y):
        mu += counts / (2 * np.pi * sigma**2) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return rng.poisson(mu).astype(float), x, y


def test_seeds_between_overlapping_columns_are_dropped_and_columns_kept():
    img, x, y = _dense_square()
    spacing = 7.0
    inner = (x > 10) & (x < 80) & (y > 10) & (y < 80)
    # phantom seeds at the empty centres of some cells
    px, py = x[inner][::3] + spacing / 2, y[inner][::3] + spacing / 2
    sx, sy = np.r_[x, px], np.r_[y, py]
    st = estimate_fit_settings(img, sx, sy)
    fit, nx, ny, info = refine_and_complete(img, sx, sy, settings=st)
    drop = fit["no_column"]
    assert drop[x.size:x.size + px.size].all()  # every phantom dropped
    assert not drop[: x.size].any()  # no real column dropped
    assert info["n_no_column"] == px.size
    assert np.all(np.isnan(fit["x"][drop])) and not fit["fit_ok"][drop].any()
    ok = ~drop[: x.size] & inner
    assert np.all(np.hypot(fit["x"][: x.size][ok] - x[ok], fit["y"][: x.size][ok] - y[ok]) < 0.5)
