"""Shared test configuration: a non-interactive matplotlib backend and a quiet Dask."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def joint_group_sizes(monkeypatch):
    """The number of atoms of every joint fit ``refine_gaussian`` runs while the test goes on (a list, filled in)."""
    import atomds.core.refine.api as api

    sizes: list[int] = []
    fit = api.fit_joint

    def spy(*a, **k):
        sizes.append(int(np.size(a[3])))
        return fit(*a, **k)

    monkeypatch.setattr(api, "fit_joint", spy)
    return sizes
