"""How many groups the neighbourhoods form: 1 when there is no structure beyond their spread.

The merge tree of :func:`atomds.core.learn.ward_linkage` always has a top merge, whatever the data.
:func:`significant_splits` splits it from the top only where the two children are separate groups
(a density valley between them, deeper than chance makes it in one Gaussian group of their size);
:func:`suggest_k` is the older largest-drop rule, which cannot say 1.

Pure NumPy/SciPy.
"""

from __future__ import annotations

import numpy as np

from atomds.errors import InvalidParameterError

from .learn import check_descriptor

__all__ = [
    "VALLEY_RATIO",
    "NULL_QUANTILE",
    "NULL_DRAWS",
    "MIN_GROUP_FRACTION",
    "MIN_GROUP_ATOMS",
    "valley_ratio",
    "null_valley_threshold",
    "significant_splits",
    "suggest_k",
]

#: A branch of the merge tree is split into its two children only when the density of the atoms,
#: projected on the line through the children's means, dips between the children's peaks to at
#: most this fraction of the lower peak. A unimodal group cut in two by the tree has no dip: its
#: ratio is 1 less the density estimate's noise (about 0.1 for the smallest groups split,
#: MIN_GROUP_ATOMS); two equal Gaussian groups reach 0.75 at about 2.75 standard deviations apart.
#: (Measured: noise splits of 24 single-phase images 0.99-1.0; a disordered band against a grain
#: 0.38-0.64.)
VALLEY_RATIO = 0.75
#: The dip must also be deeper than chance makes it in a single Gaussian group of the same size cut
#: in the same proportions: below this quantile of NULL_DRAWS such null ratios (small groups have
#: noisy density estimates; 80 atoms of one Gaussian can show a ratio of 0.6).
NULL_QUANTILE = 0.01
NULL_DRAWS = 60
#: A child smaller than this share of the atoms (or than MIN_GROUP_ATOMS) is not a group of its own.
MIN_GROUP_FRACTION = 0.01
MIN_GROUP_ATOMS = 30
_KDE_BINS = 512  # grid of the projected density


def valley_ratio(a, b) -> float:
    """Depth of the density valley between two groups of descriptor rows.

    Both groups are projected on the line through their means; the density of the projection is
    estimated on a grid (a histogram smoothed by a Gaussian kernel whose width follows Silverman's
    rule on the *within-group* spread, so a real gap is not smoothed away). Each group's peak is
    the highest density within its central 90 %; the valley is the lowest density between the two
    peaks. The ratio valley / lower peak is about 1 when the tree merely cut one unimodal group in
    two (a noise split: the lowest density between the peaks is at a peak), and falls towards 0
    when the groups are separate.

    Parameters
    ----------
    a, b : array (n_a, f), (n_b, f)
        Descriptor rows of the two groups (finite).

    Returns
    -------
    float
        Valley depth in [0, 1]; NaN when a group is empty or the two means coincide.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    axis = b.mean(axis=0) - a.mean(axis=0)
    norm = float(np.linalg.norm(axis))
    if not norm > 0:
        return float("nan")
    ta = a @ (axis / norm)
    tb = b @ (axis / norm)
    t = np.concatenate([ta, tb])
    within = np.concatenate([ta - np.median(ta), tb - np.median(tb)])
    iqr = np.subtract(*np.percentile(within, [75, 25]))
    spread = min(float(within.std()), iqr / 1.349) if iqr > 0 else float(within.std())
    if not spread > 0:
        return 0.0 if np.ptp(t) > 0 else float("nan")
    h = 0.9 * spread * len(t) ** -0.2
    lo, hi = float(t.min()) - 3 * h, float(t.max()) + 3 * h
    step = (hi - lo) / _KDE_BINS
    from scipy.ndimage import gaussian_filter1d

    dens = gaussian_filter1d(np.histogram(t, bins=_KDE_BINS, range=(lo, hi))[0].astype(float), h / step)

    def peak(g):
        q0, q1 = np.percentile(g, [5, 95])
        i0, i1 = int((q0 - lo) / step), int((q1 - lo) / step) + 1
        i1 = max(i1, i0 + 1)
        j = i0 + int(np.argmax(dens[i0:i1]))
        return j, dens[j]

    ja, pa = peak(ta)
    jb, pb = peak(tb)
    j0, j1 = min(ja, jb), max(ja, jb)
    valley = dens[j0 : j1 + 1].min()
    low = min(pa, pb)
    return float(valley / low) if low > 0 else float("nan")


def null_valley_threshold(n_a: int, n_b: int, *, draws: int = NULL_DRAWS, quantile: float = NULL_QUANTILE,
                          seed: int = 0) -> float:
    """The valley ratio that one Gaussian group of ``n_a + n_b`` rows, cut in the same proportions,
    stays above with probability ``1 - quantile`` (the :func:`valley_ratio` of ``draws`` such cuts).

    The cut mimics the tree's: the lowest ``n_a`` values of the sample against the others, so the
    null carries the same selection (the split is where the tree put it, not a random one).
    """
    rng = np.random.default_rng(seed)
    n = int(n_a) + int(n_b)
    out = np.empty(int(draws))
    for i in range(int(draws)):  # a few tens of 1-D draws
        t = np.sort(rng.standard_normal(n))[:, None]
        out[i] = valley_ratio(t[: int(n_a)], t[int(n_a):])
    return float(np.quantile(out, quantile))


def _node_members(Z, n_leaves: int):
    """Children of every internal node and the leaves under it (leaf lists built once, bottom-up)."""
    Z = np.asarray(Z)
    kids = Z[:, :2].astype(np.int64)
    members: list[np.ndarray] = [np.array([i], dtype=np.int64) for i in range(n_leaves)]
    for left, right in kids:  # one step per merge (at most a few thousand), never per atom
        members.append(np.concatenate([members[left], members[right]]))
    return kids, members


def significant_splits(
    Z,
    X,
    leaf,
    *,
    k_range=range(1, 11),
    valley: float = VALLEY_RATIO,
    min_size: int | None = None,
) -> tuple[int, list[dict]]:
    """Number of groups in the data: split the merge tree from the top while the splits are real.

    The tree always has a top merge, whatever the data: a homogeneous crystal cut in two by the
    position noise looks like two clusters to any largest-drop rule. Here a branch is split only
    when its two children are separate groups in descriptor space (:func:`valley_ratio` at most
    ``valley`` and below what one Gaussian group of their size shows by chance,
    :func:`null_valley_threshold`) and both hold at least ``min_size`` atoms. Branches are examined from the highest
    merge down, so K grows as it would by cutting the tree lower; the count stops at the largest K
    of ``k_range`` and is raised to its smallest (forced splits are recorded as such). K = 1 means
    no structure beyond the spread within one group.

    Parameters
    ----------
    Z : array (L - 1, 4)
        Linkage matrix over L leaves (:func:`ward_linkage`).
    X : array (n, f)
        Descriptor rows (finite) that the tree was built from.
    leaf : array of int (n,)
        Leaf of each row (:func:`ward_linkage`'s second output).
    k_range : iterable of int
        Allowed numbers of groups (positive).
    valley : float
        Largest valley ratio at which a split counts as real (:data:`VALLEY_RATIO`).
    min_size : int, optional
        Smallest group, in rows; default ``max(MIN_GROUP_ATOMS, MIN_GROUP_FRACTION * n)``.

    Returns
    -------
    K : int
        The number of groups.
    tests : list of dict
        One record per branch examined: ``node``, ``height``, ``sizes`` (rows of each child),
        ``valley_ratio``, ``null_threshold`` (NaN where not needed) and ``split`` (``"real"``,
        ``"forced"``, ``"no"`` or ``"too small"``).
    """
    Z = np.asarray(Z, dtype=float)
    X = check_descriptor(X, min_rows=1)
    leaf = np.asarray(leaf, dtype=np.int64)
    if leaf.shape != (len(X),):
        raise InvalidParameterError(f"leaf must give one leaf per row of X ({len(X)}), got shape {leaf.shape}")
    ks = sorted(int(k) for k in k_range)
    if not ks or ks[0] < 1:
        raise InvalidParameterError(f"k_range must hold positive integers, got {list(k_range)!r}")
    if not 0 < valley < 1:
        raise InvalidParameterError(f"valley must lie in (0, 1), got {valley!r}")
    n_leaves = len(Z) + 1
    n = len(X)
    if min_size is None:
        min_size = max(MIN_GROUP_ATOMS, int(np.ceil(MIN_GROUP_FRACTION * n)))
    k_min, k_max = ks[0], min(ks[-1], n)
    if n_leaves < 2:
        return 1, []
    kids, members = _node_members(Z, n_leaves)
    rows_of_leaf = np.argsort(leaf, kind="stable")
    starts = np.searchsorted(leaf[rows_of_leaf], np.arange(n_leaves + 1))

    def rows(node: int) -> np.ndarray:
        lv = members[node]
        return np.concatenate([rows_of_leaf[starts[i] : starts[i + 1]] for i in lv]) if lv.size else lv

    open_nodes = [2 * n_leaves - 2]  # the root
    final: list[int] = []
    tests: list[dict] = []
    while open_nodes and len(open_nodes) + len(final) < k_max:
        # the highest open branch first, as when the tree is cut lower and lower
        open_nodes.sort(key=lambda v: Z[v - n_leaves, 2] if v >= n_leaves else -np.inf)
        node = open_nodes.pop()
        if node < n_leaves:
            final.append(node)
            continue
        left, right = kids[node - n_leaves]
        ra, rb = rows(int(left)), rows(int(right))
        ratio = valley_ratio(X[ra], X[rb]) if min(ra.size, rb.size) > 0 else float("nan")
        count = len(open_nodes) + len(final) + 1
        null = float("nan")
        if min(ra.size, rb.size) < min_size:
            verdict = "forced" if count < k_min else "too small"
        elif np.isfinite(ratio) and ratio <= valley and ratio < (null := null_valley_threshold(ra.size, rb.size)):
            verdict = "real"
        else:
            verdict = "forced" if count < k_min else "no"
        tests.append(dict(node=int(node), height=float(Z[node - n_leaves, 2]), sizes=[int(ra.size), int(rb.size)],
                          valley_ratio=float(ratio), null_threshold=null, split=verdict))
        if verdict in ("real", "forced"):
            open_nodes += [int(left), int(right)]
        else:
            final.append(node)
    return len(open_nodes) + len(final), tests


def suggest_k(Z, k_range=range(2, 11), *, tolerance: float = 0.2) -> int:
    """Number of clusters after the largest drop in merge height of a linkage tree.

    Cutting the tree into K clusters undoes its top K - 1 merges. With ``h(K)`` the height of the
    merge that joins K clusters into K - 1, the drop at K is measured on the logarithmic height
    axis, ``log h(K) - log h(K + 1)``: how much higher the K clusters merge than any of them
    splits. Ward heights grow with the size of the clusters merged, so an absolute drop favours
    splitting the largest groups and misses a small but distinct one (a boundary band, a minority
    phase); the relative drop weighs them alike.

    When several cuts have nearly the largest drop (within ``tolerance`` of it), the finest is
    returned: nearly equal drops mean nearly equally distinct levels, and the finer keeps a small
    distinct group that the coarser would merge into a large one (a coarser grouping is recovered
    afterwards by joining clusters, e.g. :func:`merge_sites`, :func:`dissolve_transitions`;
    a lost group is not). ``tolerance=0`` returns strictly the largest drop.
    """
    Z = np.asarray(Z, dtype=float)
    ks = np.array(sorted(int(k) for k in k_range))
    if ks.size == 0 or ks[0] < 1:
        raise InvalidParameterError(f"k_range must hold positive integers, got {list(k_range)!r}")
    if not 0 <= tolerance < 1:
        raise InvalidParameterError(f"tolerance must lie in [0, 1), got {tolerance!r}")
    n_leaves = len(Z) + 1
    heights = np.sort(Z[:, 2])[::-1]  # heights[K - 2] joins K clusters into K - 1
    ks = ks[(ks >= 2) & (ks < n_leaves)]
    if ks.size == 0:
        raise InvalidParameterError(
            f"k_range {list(k_range)!r} has no K in [2, {n_leaves - 1}] for a tree of {n_leaves} leaves"
        )
    tiny = np.finfo(float).tiny
    hk = np.maximum(heights[ks - 2], tiny)
    hk1 = np.maximum(heights[ks - 1], tiny)
    drops = np.log(hk) - np.log(hk1)
    near = drops >= (1.0 - tolerance) * drops.max()
    return int(ks[near].max())
