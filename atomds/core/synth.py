"""Rendering of synthetic atomic-column images: kept as an import path of :mod:`atomds.core.samples.render`.

Columns are 2-D Gaussians integrated over each pixel, on a smooth background, with Poisson shot
noise and Gaussian read noise (positions in pixels, pixel centres at integer coordinates). The
code lives in :mod:`atomds.core.samples.render`, beside the generators that use it.
"""

from __future__ import annotations

from .samples.render import add_noise, render_columns, smooth_background

__all__ = ["render_columns", "add_noise", "smooth_background"]
