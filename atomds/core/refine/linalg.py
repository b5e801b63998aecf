"""Stacks of small linear systems: batched dot products, solves and inverses (NumPy + a compiled kernel)."""

from __future__ import annotations

import numpy as np
from numba import njit

from .parallel import in_threads

__all__ = ["wsum", "solve_batched", "invert_batched"]


def wsum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-atom sum of a * b over a patch stack (n, w, w) (a batched dot product)."""
    n = a.shape[0]
    return np.matmul(a.reshape(n, 1, -1), b.reshape(n, -1, 1))[:, 0, 0].astype(np.float64)


def solve_batched(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve a stack of small symmetric positive-definite systems (n, k, k) x = (n, k).

    Gaussian elimination without pivoting, vectorised over the stack (the LM matrices are
    damped normal matrices); singular or non-finite systems give NaN (the step is rejected).
    """
    k = a.shape[1]
    at = np.ascontiguousarray(a.transpose(1, 2, 0))  # (k, k, n): rows of all systems at once
    bt = np.array(b.T, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        for j in range(k):
            piv = at[j, j]
            f = at[j + 1 :, j] / piv  # (k - j - 1, n)
            at[j + 1 :, j:] -= f[:, None, :] * at[j, j:][None, :, :]
            bt[j + 1 :] -= f * bt[j]
        x = np.empty_like(bt)
        for i in range(k - 1, -1, -1):
            x[i] = (bt[i] - (at[i, i + 1 :] * x[i + 1 :]).sum(axis=0)) / at[i, i]
    x = x.T
    x[~np.isfinite(x).all(axis=1)] = np.nan
    return x


def invert_batched(a: np.ndarray) -> np.ndarray:
    """Inverses of a stack of small matrices (n, k, k); NaN where not finite, pseudo-inverse where singular."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    out = np.empty(a.shape)
    singular = np.zeros(a.shape[0], dtype=bool)
    in_threads(_nb_invert, a.shape[0], a, out, singular)
    if singular.any():
        out[singular] = np.linalg.pinv(a[singular])
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _nb_invert(start, stop, a, out, singular):
    """Inverses of matrices ``a[start:stop]`` (Gauss-Jordan, partial pivoting); NaN where not finite."""
    k = a.shape[1]
    m = np.empty((k, k))
    for i in range(start, stop):
        inv = out[i]
        finite = True
        for r in range(k):
            for c in range(k):
                m[r, c] = a[i, r, c]
                inv[r, c] = 1.0 if r == c else 0.0
                finite = finite and np.isfinite(a[i, r, c])
        singular[i] = False
        if finite:
            for c in range(k):
                piv = c
                for r in range(c + 1, k):
                    if abs(m[r, c]) > abs(m[piv, c]):
                        piv = r
                if m[piv, c] == 0.0:
                    singular[i] = True
                    break
                if piv != c:
                    for cc in range(k):
                        m[c, cc], m[piv, cc] = m[piv, cc], m[c, cc]
                        inv[c, cc], inv[piv, cc] = inv[piv, cc], inv[c, cc]
                f = 1.0 / m[c, c]
                for cc in range(k):
                    m[c, cc] *= f
                    inv[c, cc] *= f
                for r in range(k):
                    if r != c and m[r, c] != 0.0:
                        f = m[r, c]
                        for cc in range(k):
                            m[r, cc] -= f * m[c, cc]
                            inv[r, cc] -= f * inv[c, cc]
        if not finite or singular[i]:
            for r in range(k):
                for c in range(k):
                    inv[r, c] = np.nan
