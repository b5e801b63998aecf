"""Regions (phases) from cluster labels on the atom graph: which clusters are sites of one phase,
transitions between two regions, lines or enclosed strips (interfaces), and smoothing and filling of
labels. Every function reads per-atom labels and the neighbour index table; none loops over atoms.

Pure NumPy/SciPy.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "contact_matrix",
    "merge_sites",
    "GRADUAL_STEP",
    "THROUGH_GAPS_SHARE",
    "gradual_contacts",
    "transition_clusters",
    "dissolve_transitions",
    "MIN_INTERNAL_CONTACT",
    "MIN_MATERIAL_CONTACT",
    "thin_clusters",
    "JOIN_MIN_SHARE",
    "join_touching",
    "interior_fraction",
    "MAX_STRIP_INTERIOR",
    "MIN_ENCLOSING_CONTACT",
    "enclosed_strips",
    "dissolve_thin",
    "off_the_crystal",
    "vote_labels",
    "fill_labels",
]

def contact_matrix(labels, index, n_labels: int | None = None) -> np.ndarray:
    """Symmetric count of neighbour pairs between labels.

    ``C[a, b]`` counts the pairs (atom i, its neighbour j) with labels a and b, plus the pairs
    with labels b and a (so ``C[a, a]`` counts within-label pairs twice). Atoms or neighbours with
    a negative label, and missing neighbours (-1), are skipped.
    """
    labels = np.asarray(labels, dtype=np.int64)
    index = np.asarray(index, dtype=np.int64)
    L = int(labels.max(initial=-1)) + 1 if n_labels is None else int(n_labels)
    li = np.broadcast_to(labels[:, None], index.shape)
    lj = np.where(index >= 0, labels[np.maximum(index, 0)], -1)
    ok = (li >= 0) & (lj >= 0)
    C = np.zeros((L, L))
    np.add.at(C, (li[ok], lj[ok]), 1.0)
    return C + C.T


def merge_sites(labels, index, n_labels: int | None = None, *, descriptor=None, disordered=None) -> np.ndarray:
    """Group clusters that are different sites of one phase into regions.

    Sites of one crystal interpenetrate: each atom of site a has atoms of site b among its
    nearest neighbours all over the phase. Two separate regions touch only along their common
    border. So clusters a and b are joined when a-b neighbour pairs are more frequent than a-a
    pairs and than b-b pairs, ``C[a, b] > max(C[a, a], C[b, b])`` with :func:`contact_matrix`
    (both sides count each pair twice); joins are transitive. A boundary band between two
    regions shares its atoms' neighbours between itself and the two sides; once it is two atoms
    thick it has more neighbour pairs inside itself than with either side, so it stays a region
    of its own. With the ``descriptor`` (n, features) of the atoms, clusters across whose contacts
    it changes only gradually are joined too (:func:`gradual_contacts`: one lattice distorted
    smoothly, by a strain field or the scan, not two phases), but not across the gaps of a
    ``disordered`` cluster between them (bool per cluster; ``through`` of :func:`gradual_contacts`).

    Returns
    -------
    ndarray of int64 (n_labels,)
        Region of each cluster, numbered from 0 by decreasing number of atoms.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    labels = np.asarray(labels, dtype=np.int64)
    L = int(labels.max(initial=-1)) + 1 if n_labels is None else int(n_labels)
    if L == 0:
        return np.zeros(0, dtype=np.int64)
    C = contact_matrix(labels, index, L)
    self_c = np.diag(C)
    join = C > np.maximum(self_c[:, None], self_c[None, :])
    if descriptor is not None:
        join |= gradual_contacts(descriptor, labels, index, L, through=disordered)
    np.fill_diagonal(join, False)
    _, comp = connected_components(csr_matrix(join), directed=False)
    sizes = np.bincount(labels[labels >= 0], minlength=L)
    comp_size = np.bincount(comp, weights=sizes)
    order = np.argsort(-comp_size, kind="stable")
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    return remap[comp].astype(np.int64)


#: Two clusters are one lattice distorted gradually when, across their contacts, the descriptor
#: steps by less than this fraction of the distance between their mean descriptors: the change
#: takes more than two or three columns. (Measured: 0.26-0.28 between the two halves of a square
#: lattice under a sinusoidal scan distortion, local shear -4 to +14 %; 0.56-1.04 between the
#: clusters of the two-phase samples, where the lattice changes at an interface.)
GRADUAL_STEP = 0.4
#: ... judged on at least this many neighbour pairs across the contact (the neighbour table lists a
#: pair from both sides where each is among the other's neighbours: about half as many contacts).
GRADUAL_MIN_PAIRS = 10
#: ... and not judged where more than this share of the contact pairs have an atom beside a disordered
#: cluster (:func:`gradual_contacts`'s ``through``): the two meet through its gaps. Set on generated
#: images only: a grain behind a band (nearly all its contacts beside the band) and a review's film
#: over an amorphous substrate (one row of its border of 12-40 beside it).
THROUGH_GAPS_SHARE = 0.5


def gradual_contacts(X, labels, index, n_labels: int | None = None, *, max_step: float = GRADUAL_STEP,
                     min_pairs: int = GRADUAL_MIN_PAIRS, through=None) -> np.ndarray:
    """Pairs of clusters across whose contacts the descriptor changes only gradually.

    For clusters a and b, the neighbour pairs (i in a, j in b) are projected on the line from a's
    mean descriptor to b's: at an interface between two phases each atom of a pair is typical of
    its own side and the median step is most of the distance between the means; where one lattice
    is distorted smoothly (a strain gradient, a scan distortion) the descriptor runs from one mean
    to the other over many columns, and a step is a fraction of it. The pair is gradual when the
    median step is below ``max_step`` of that distance (on at least ``min_pairs`` pairs). Sites of
    one phase are neighbours with distinct descriptors: a step of the whole distance.

    Clusters that meet through the gaps of a disordered cluster (``through``, bool per cluster) are
    not judged: where most of their contact pairs have an atom beside that cluster. A grain of
    another phase behind a disordered band touches the matrix only there, and the columns beside the
    band's gaps are distorted alike on both sides, so that the step across looks gradual (two_phase
    images with a honeycomb or square grain: ARI 0.27-0.49 where they were joined). A film split by a
    gradient over an amorphous substrate touches itself along a border that runs up from the
    substrate, most of its pairs away from it.

    Parameters
    ----------
    X : array (n, m)
        Descriptor of each atom (rows with NaN are left out).
    labels : int array (n,)
        Cluster of each atom (negative: none).
    index : int array (n, k)
        Neighbour indices (-1: none).
    n_labels : int, optional

    Returns
    -------
    bool ndarray (n_labels, n_labels)
        Symmetric; True for the gradual pairs.
    """
    X = np.asarray(X, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    index = np.asarray(index, dtype=np.int64)
    L = int(labels.max(initial=-1)) + 1 if n_labels is None else int(n_labels)
    out = np.zeros((L, L), dtype=bool)
    if L < 2 or X.ndim != 2 or X.shape[0] != labels.size:
        return out
    fin = np.isfinite(X).all(axis=1) & (labels >= 0)
    means = np.full((L, X.shape[1]), np.nan)
    for k in range(L):
        if np.any(fin & (labels == k)):
            means[k] = X[fin & (labels == k)].mean(axis=0)
    dis = np.zeros(L + 1, dtype=bool)  # the disordered clusters (the last entry stands for no label)
    if through is not None:
        dis[:L] = np.asarray(through, dtype=bool)[:L]
    beside = (dis[np.where(index >= 0, labels[np.maximum(index, 0)], L)] & (index >= 0)).any(axis=1)
    i = np.broadcast_to(np.arange(labels.size)[:, None], index.shape).ravel()
    j = index.ravel()
    ok = j >= 0
    i, j = i[ok], j[ok]
    ok = fin[i] & fin[j] & (labels[i] != labels[j])
    i, j = i[ok], j[ok]
    a, b = labels[i], labels[j]
    for ka, kb in {(int(u), int(v)) for u, v in zip(np.minimum(a, b), np.maximum(a, b))}:
        d = means[kb] - means[ka]
        sep = float(np.linalg.norm(d))
        if not np.isfinite(sep) or sep == 0:
            continue
        # each pair oriented from ka to kb (the neighbour table lists it from either side)
        m = ((a == ka) & (b == kb)) | ((a == kb) & (b == ka))
        if np.count_nonzero(m) < min_pairs:
            continue
        if not (dis[ka] or dis[kb]) and np.mean(beside[i[m]] | beside[j[m]]) > THROUGH_GAPS_SHARE:
            continue  # they meet through a disordered cluster's gaps
        step = (X[j[m]] - X[i[m]]) @ (d / sep)
        step = np.where(a[m] == ka, step, -step)
        if float(np.median(step)) < max_step * sep:
            out[ka, kb] = out[kb, ka] = True
    return out


def transition_clusters(centers, labels, index, *, max_offset: float = 1.0 / 3.0, min_contact: float = 0.1):
    """Clusters that are only the transition between two others (interfaces), and between which.

    Where two regions meet, atoms whose neighbourhoods are part one, part the other form a
    cluster of their own once K is large enough. Such a cluster c is recognised by two signs:

    * its centre lies on the way between the centres of two other clusters a and b: projected on
      the segment a-b it falls inside it (0 < t < 1) and lies off it by at most ``max_offset``
      of the segment's length (a mixture of two kinds of neighbourhood);
    * in space it touches both: at least ``min_contact`` of its neighbour pairs go to a, and as
      much to b.

    A distinct phase or a disordered band is not a mixture of its neighbours - its own features
    (e.g. the disorder score of the "phase" descriptor) put its centre well off such a segment.

    Returns
    -------
    ndarray of int64 (K, 2)
        For each cluster the pair (a, b) it is a transition between (the one it lies closest
        to the segment of), or (-1, -1).
    """
    C = np.asarray(centers, dtype=float)
    K = len(C)
    out = np.full((K, 2), -1, dtype=np.int64)
    if K < 3:
        return out
    cont = contact_matrix(labels, index, K)
    tot = cont.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = cont / tot[:, None]
    best = np.full(K, np.inf)
    for a in range(K):  # loops over clusters (K <= a few tens), never over atoms
        for b in range(a + 1, K):
            ab = C[b] - C[a]
            L2 = float(ab @ ab)
            if L2 <= 0:
                continue
            t = (C - C[a]) @ ab / L2
            off = np.linalg.norm(C - C[a] - t[:, None] * ab[None, :], axis=1) / np.sqrt(L2)
            ok = (t > 0) & (t < 1) & (off <= max_offset) & (frac[:, a] >= min_contact) & (frac[:, b] >= min_contact)
            ok[[a, b]] = False
            better = ok & (off < best)
            best[better] = off[better]
            out[better] = (a, b)
    return out


def dissolve_transitions(X, labels, centers, index, **kw):
    """Give the atoms of transition clusters (:func:`transition_clusters`) to the two clusters
    they lie between (each atom to the nearer centre), one cluster at a time, until none is left.

    Returns
    -------
    labels : ndarray of int64
        Labels with the dissolved clusters' atoms reassigned (their ids are no longer used).
    dissolved : list of int
        The clusters dissolved, in order.
    """
    X = np.asarray(X, dtype=float)
    lab = np.asarray(labels, dtype=np.int64).copy()
    C = np.asarray(centers, dtype=float)
    alive = np.ones(len(C), dtype=bool)
    dissolved = []
    while alive.sum() >= 3:
        ids = np.flatnonzero(alive)
        remap = np.full(len(C), -1, dtype=np.int64)
        remap[ids] = np.arange(len(ids))
        sub = np.where(lab >= 0, remap[np.maximum(lab, 0)], -1)
        pairs = transition_clusters(C[ids], sub, index, **kw)
        cand = np.flatnonzero(pairs[:, 0] >= 0)
        if cand.size == 0:
            break
        # dissolve the smallest transition cluster first
        sizes = np.bincount(sub[sub >= 0], minlength=len(ids))
        c = cand[np.argmin(sizes[cand])]
        a, b = ids[pairs[c]]
        members = lab == ids[c]
        da = ((X[members] - C[a]) ** 2).sum(axis=1)
        db = ((X[members] - C[b]) ** 2).sum(axis=1)
        lab[members] = np.where(da <= db, a, b)
        alive[ids[c]] = False
        dissolved.append(int(ids[c]))
    return lab, dissolved


#: A cluster whose atoms have fewer than this share of their neighbour pairs inside the cluster is
#: a line, not an area: an interface one column wide (antiphase or grain boundary) or scattered
#: defect sites. A line of columns keeps about 1/3 of its pairs inside, a band two columns wide
#: about 0.55-0.6 (disordered ones a little less): the threshold lies between.
MIN_INTERNAL_CONTACT = 0.42
#: A disordered cluster is material (amorphous, a disordered band) however narrow, but not when its
#: atoms are scattered: fewer than one in six of their neighbour pairs inside it (a line of columns
#: keeps a third; six stray finds along a grain boundary of one phase, 0.057, kept as a region of
#: their own on one generated image of 16; a band's fragment of 32 atoms, 0.166, joins the band
#: first, :func:`join_touching`).
MIN_MATERIAL_CONTACT = 1.0 / 6.0


def thin_clusters(labels, index, n_labels: int | None = None, *, min_internal: float = MIN_INTERNAL_CONTACT):
    """Clusters that are lines or scattered sites rather than areas (see :data:`MIN_INTERNAL_CONTACT`).

    Returns
    -------
    ndarray of bool (n_labels,)
        True for a cluster with atoms whose share of internal neighbour pairs
        (``C[c, c] / C[c, :].sum()`` with :func:`contact_matrix`) is below ``min_internal``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    L = int(labels.max(initial=-1)) + 1 if n_labels is None else int(n_labels)
    C = contact_matrix(labels, index, L)
    tot = C.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        internal = np.where(tot > 0, np.diag(C) / tot, 1.0)
    return internal < float(min_internal)


#: Disordered regions are joined where they touch along a border of their own: at least this share
#: of the outside neighbour pairs of one of them go to the other (:func:`join_touching`).
JOIN_MIN_SHARE = 0.4


def join_touching(labels, index, which, n_labels: int | None = None, *, min_share: float = JOIN_MIN_SHARE,
                  max_interior: float | None = None):
    """Join the labels flagged in ``which`` that touch along a border of their own where one of them
    is a strip.

    k-means can split a disordered band along its length: the half by one phase and the half by
    the other differ in density (a band four spacings wide as two strips: band F1 0.72-0.76 on
    generated two-phase images), but disorder has no lattice by which two such halves would be two
    phases. Two labels touch along a border of their own when at least ``min_share`` of the outside
    neighbour pairs of one go to the other (:func:`contact_matrix`); one of them must be a strip,
    fewer than ``max_interior`` of its atoms with all neighbours inside it (default
    :data:`MAX_STRIP_INTERIOR`). Two amorphous areas side by side, each with an interior, stay
    apart: their densities can be two materials.

    Returns
    -------
    ndarray of int64 (n_labels,)
        For each label, the label it joins (the smallest of its group; itself when not joined).
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    labels = np.asarray(labels, dtype=np.int64)
    L = int(labels.max(initial=-1)) + 1 if n_labels is None else int(n_labels)
    which = np.asarray(which, dtype=bool)
    if which.shape != (L,):
        raise ValueError(f"which has shape {which.shape}; one flag per label ({L}) is needed")
    out = np.arange(L, dtype=np.int64)
    if np.count_nonzero(which) < 2:
        return out
    strip = interior_fraction(labels, index, L) < (MAX_STRIP_INTERIOR if max_interior is None else float(max_interior))
    C = contact_matrix(labels, index, L)
    np.fill_diagonal(C, 0.0)
    outside = C.sum(axis=1)  # all its outside neighbour pairs
    C[:, ~which] = 0.0
    join = np.zeros((L, L), dtype=bool)
    for a in np.flatnonzero(which & strip):  # a few regions
        b = int(np.argmax(C[a]))
        if C[a, b] > 0 and C[a, b] >= float(min_share) * outside[a]:
            join[a, b] = True
    _, comp = connected_components(csr_matrix(join), directed=False)
    first = np.full(comp.max() + 1, L, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(L))
    return first[comp]


def interior_fraction(labels, index, n_labels: int | None = None) -> np.ndarray:
    """Per label, the share of its atoms whose labelled neighbours all carry it (1.0 for an empty label)."""
    labels = np.asarray(labels, dtype=np.int64)
    index = np.asarray(index, dtype=np.int64)
    L = int(labels.max(initial=-1)) + 1 if n_labels is None else int(n_labels)
    lj = np.where(index >= 0, labels[np.maximum(index, 0)], -1)
    own = labels >= 0
    border = own & ((lj >= 0) & (lj != labels[:, None])).any(axis=1)
    n = np.bincount(labels[own], minlength=L).astype(float)
    interior = np.bincount(labels[own & ~border], minlength=L).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, interior / n, 1.0)


#: A region with fewer than this share of interior atoms (all labelled neighbours inside it) is a
#: strip: every column of a band two columns wide touches its border.
MAX_STRIP_INTERIOR = 0.2
#: ... and it lies inside one other region when at least this share of its outside contacts go there.
MIN_ENCLOSING_CONTACT = 0.9


def enclosed_strips(labels, index, n_labels: int | None = None, *, max_interior: float = MAX_STRIP_INTERIOR,
                    min_enclosing: float = MIN_ENCLOSING_CONTACT):
    """Labels that are narrow strips inside one other label: interfaces within one phase.

    An antiphase boundary or a twin boundary puts the columns on both of its sides in
    neighbourhoods of their own, a strip one or two columns wide with the same phase on either
    side. A band between two *different* phases touches both and is not enclosed; a grain has
    interior atoms and is not a strip. Strips that touch are judged together
    (:func:`_strip_surroundings`): the rows on the two sides of a grain boundary can be two strips
    side by side, enclosed together by one phase, and a layer between two phases split into two
    strips touches both.

    Returns
    -------
    ndarray of bool (n_labels,)
        True for a label with fewer than ``max_interior`` of its atoms interior (all labelled
        neighbours of the same label) and at least ``min_enclosing`` of its outside neighbour
        pairs going to a single other label.
    """
    labels = np.asarray(labels, dtype=np.int64)
    index = np.asarray(index, dtype=np.int64)
    L = int(labels.max(initial=-1)) + 1 if n_labels is None else int(n_labels)
    if L < 2:
        return np.zeros(L, dtype=bool)
    strip = interior_fraction(labels, index, L) < max_interior
    around = _strip_surroundings(contact_matrix(labels, index, L), strip)
    out_tot = around.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dominant = np.where(out_tot > 0, around.max(axis=1) / out_tot, 0.0)
    return strip & (dominant >= min_enclosing)


def _strip_surroundings(C: np.ndarray, strip: np.ndarray) -> np.ndarray:
    """Per label, its contacts with the labels that are not strips; for a strip, those of the group of
    strips it touches (connected through their contacts), which are judged together: the rows on
    the two sides of a grain boundary can form two strips side by side, each touching the other about
    as much as the phase around, and a layer between two phases split into a strip on each side
    touches both phases only as a whole."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    C = np.array(C, dtype=float)
    np.fill_diagonal(C, 0.0)
    out = C.copy()
    out[:, strip] = 0.0
    idx = np.flatnonzero(strip)
    if idx.size > 1:
        sub = C[np.ix_(idx, idx)] > 0
        _, comp = connected_components(csr_matrix(sub), directed=False)
        for c in np.unique(comp):
            members = idx[comp == c]
            out[members] = out[members].sum(axis=0)
    return out


#: A strip enclosed by one region whose atoms sit, at least this share of them, on that region's
#: lattice is the rows along an interface within the phase (:func:`strips_on_lattice`). Measured on
#: generated images only: 0.94 for a grain boundary's strip, 0.29 for a disordered band two spacings
#: wide; one grain boundary of ten gave 0.49 and stays a phase.
ON_LATTICE_SHARE = 0.7
#: Rounds of :func:`atomds.core.find.lattice.supported_by_lattice` in :func:`strips_on_lattice`: the
#: strip's atoms found on the lattice stand for the next row, so that the second row from the
#: boundary is judged on the first (generated grains of one phase, 28 strips: 0.28-0.88 of their
#: atoms on the lattice after one round, 0.83-0.98 after five; disordered bands 0.07-0.27 and
#: 0.09-0.29).
STRIP_LATTICE_ROUNDS = 5


def strips_on_lattice(x, y, labels, index, n_labels: int | None = None, *,
                      min_share: float = ON_LATTICE_SHARE, rounds: int = STRIP_LATTICE_ROUNDS) -> np.ndarray:
    """Per label: is it a strip enclosed by one other label (:func:`enclosed_strips`) whose atoms
    mostly (``min_share``) sit on the lattice of that label
    (:func:`atomds.core.find.lattice.supported_by_lattice`, at the enclosing atoms' median
    nearest-neighbour distance)?

    Along a grain boundary between two rotated grains of one phase, the columns on both sides have
    neighbours across the boundary at no lattice vector and look disordered, yet each sits on its
    own grain's lattice; the columns of a disordered band sit anywhere. ``x``, ``y`` in any one
    length unit.
    """
    from .find.lattice import supported_by_lattice
    from .spectra import median_nn_distance

    labels = np.asarray(labels, dtype=np.int64)
    L = int(labels.max(initial=-1)) + 1 if n_labels is None else int(n_labels)
    out = np.zeros(L, dtype=bool)
    if L < 2:
        return out
    strips = enclosed_strips(labels, index, L)
    if not strips.any():
        return out
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    around = _strip_surroundings(contact_matrix(labels, index, L), strips).argmax(axis=1)
    for r in np.flatnonzero(strips):  # a handful of regions
        mine, anchor = labels == r, labels == around[r]
        if not (mine.any() and np.count_nonzero(anchor) >= 5):
            continue
        d = median_nn_distance(x[anchor], y[anchor])
        if not np.isfinite(d):
            continue
        on = supported_by_lattice(x, y, anchor, d, candidates=mine, max_rounds=int(rounds))
        out[r] = float(np.mean(on[mine])) >= min_share
    return out


#: Rounds of :func:`dissolve_thin` at most: an interface can be two clusters side by side (the rows
#: on either side of a grain boundary), neither of them enclosed by one region until the thinner one
#: is gone.
DISSOLVE_ROUNDS = 4


def dissolve_thin(labels, index, n_labels: int | None = None, *, min_internal: float = MIN_INTERNAL_CONTACT,
                  keep=None, max_passes: int = 50):
    """Give the atoms of thin clusters (:func:`thin_clusters`) and of strips enclosed by one other
    cluster (:func:`enclosed_strips`) to the clusters around them, in rounds (at most
    :data:`DISSOLVE_ROUNDS`) until none is left: along a grain boundary between two rotated grains
    of one phase the rows on its two sides can form two clusters, a line (dissolved) and a strip
    that touched the line as much as the phase around (3 of 8 images of such grains came out as two
    phases); with the line gone the strip is enclosed by the phase and is dissolved in turn.

    Returns
    -------
    labels : ndarray of int64
        Labels with the thin clusters' atoms reassigned where a kept neighbour exists.
    dissolved : list of int
        The clusters dissolved, in the order they went.
    """
    lab = np.asarray(labels, dtype=np.int64)
    L = int(lab.max(initial=-1)) + 1 if n_labels is None else int(n_labels)
    out: list[int] = []
    for _ in range(DISSOLVE_ROUNDS):
        lab, gone = _dissolve_thin_once(lab, index, L, min_internal=min_internal, keep=keep, max_passes=max_passes)
        out += gone
        if not gone:
            break
    return lab, out


def _dissolve_thin_once(labels, index, n_labels: int | None = None, *, min_internal: float = MIN_INTERNAL_CONTACT,
                        keep=None, max_passes: int = 50):
    """One round of :func:`dissolve_thin`: give the atoms of thin clusters (:func:`thin_clusters`) and of strips
    enclosed by one other cluster (:func:`enclosed_strips`) to the clusters around them.

    Each atom of a thin cluster takes the most frequent label among its neighbours that belong to
    clusters kept, repeated until every such atom has one (a wide patch fills from its rim in).
    At least one cluster is always kept (the largest, when all are thin), and so are the clusters
    flagged in ``keep`` (bool, one per cluster; e.g. disordered ones: amorphous material is a phase
    of its own however narrow).

    Returns
    -------
    labels : ndarray of int64
        Labels with the thin clusters' atoms reassigned where a kept neighbour exists.
    dissolved : list of int
        The clusters dissolved.
    """
    lab = np.asarray(labels, dtype=np.int64).copy()
    index = np.asarray(index, dtype=np.int64)
    L = int(lab.max(initial=-1)) + 1 if n_labels is None else int(n_labels)
    if L < 2:
        return lab, []
    thin = thin_clusters(lab, index, L, min_internal=min_internal) | enclosed_strips(lab, index, L)
    if keep is not None:
        thin &= ~np.asarray(keep, dtype=bool)
    sizes = np.bincount(lab[lab >= 0], minlength=L)
    thin &= sizes > 0
    if sizes.any() and thin[sizes > 0].all():  # (clusters dissolved in an earlier round are empty)
        thin[np.argmax(sizes)] = False
    dissolved = [int(c) for c in np.flatnonzero(thin)]
    if not dissolved:
        return lab, []
    todo = (lab >= 0) & thin[np.maximum(lab, 0)]
    lab[todo] = -2  # waiting for a label
    rows = np.arange(len(lab))
    for _ in range(int(max_passes)):  # each pass moves the filled rim one neighbour inwards
        if not todo.any():
            break
        lj = np.where(index >= 0, lab[np.maximum(index, 0)], -1)
        ok = (lj >= 0) & todo[:, None]
        if not ok.any():
            break
        votes = np.zeros((len(lab), L))
        np.add.at(votes, (np.broadcast_to(rows[:, None], lj.shape)[ok], lj[ok]), 1.0)
        got = todo & (votes.max(axis=1) > 0)
        lab[got] = votes[got].argmax(axis=1)
        todo &= ~got
    lab[lab == -2] = -1
    return lab, dissolved


def off_the_crystal(x, y, labels, disordered, *, min_matches: int = 1) -> np.ndarray:
    """Atoms of the ``disordered`` labels (bool, one per label) that sit on no site of the lattice of
    any other label (the crystals).

    Along the edge of a disordered band two columns wide many of its atoms have only one or two of
    their six nearest neighbours inside it, and a plurality vote (:func:`vote_labels`) hands them to
    the crystal around; a crystal's own atoms given to the band sit on its lattice. Each crystal's
    lattice is its own (:func:`atomds.core.find.lattice.supported_by_lattice`, one round, at its
    atoms' median nearest-neighbour distance, ``min_matches`` supporting atoms: one, since a site
    on the edge of a square or honeycomb crystal has a single nearest neighbour inside it).
    ``x``, ``y`` in any one length unit; NaN positions are never on a lattice.

    Returns
    -------
    ndarray of bool (n,)
    """
    from .find.lattice import supported_by_lattice
    from .spectra import median_nn_distance

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    labels = np.asarray(labels, dtype=np.int64)
    disordered = np.asarray(disordered, dtype=bool)
    finite = np.isfinite(x) & np.isfinite(y)
    mine = (labels >= 0) & disordered[np.maximum(labels, 0)]
    on = np.zeros(labels.size, dtype=bool)
    test = mine & finite
    for r in np.flatnonzero(~disordered):  # a handful of regions
        crystal = (labels == r) & finite
        if np.count_nonzero(crystal) < 5 or not test.any():
            continue
        d = median_nn_distance(x[crystal], y[crystal])
        if np.isfinite(d):
            on |= test & supported_by_lattice(x, y, crystal, d, candidates=test, max_rounds=1, min_matches=min_matches)
    return mine & ~on


def vote_labels(labels, index, *, passes: int = 1, fixed=None, open_to=None) -> np.ndarray:
    """Plurality vote of each labelled atom with its neighbours (a mode filter on the atom graph).

    Each atom with a label >= 0 takes the label most frequent among itself and its labelled
    neighbours; ties keep its own label. Removes isolated misassignments along borders
    between regions while keeping regions one atom thick (their atoms outvote in a line).
    Unlabelled atoms (-1) neither vote nor change. Atoms flagged in ``fixed`` (bool, one per atom)
    vote, but move only to the labels flagged in ``open_to`` (bool, one per label; default none).
    """
    lab = np.asarray(labels, dtype=np.int64).copy()
    index = np.asarray(index, dtype=np.int64)
    L = int(lab.max(initial=-1)) + 1
    if L == 0:
        return lab
    hold = np.zeros(len(lab), dtype=bool) if fixed is None else np.asarray(fixed, dtype=bool)
    if hold.shape != lab.shape:
        raise ValueError(f"fixed has shape {hold.shape}; one flag per atom {lab.shape} is needed")
    allowed = np.zeros(L, dtype=bool)
    if open_to is not None:
        o = np.asarray(open_to, dtype=bool)
        allowed[: min(L, o.size)] = o[:L]
    rows = np.arange(len(lab))
    for _ in range(int(passes)):
        lj = np.where(index >= 0, lab[np.maximum(index, 0)], -1)
        votes = np.zeros((len(lab), L))
        ok = lj >= 0
        np.add.at(votes, (np.broadcast_to(rows[:, None], lj.shape)[ok], lj[ok]), 1.0)
        own = lab >= 0
        votes[rows[own], lab[own]] += 1.5  # itself, plus a half vote that breaks ties in its favour
        new = votes.argmax(axis=1)
        new = np.where(hold & ~allowed[new], lab, new)
        lab = np.where(own, new, -1)
    return lab


def fill_labels(x, y, labels) -> np.ndarray:
    """Give unlabelled atoms (-1) the label of their nearest labelled atom (e.g. edge atoms)."""
    from scipy.spatial import cKDTree

    lab = np.asarray(labels, dtype=np.int64).copy()
    pos = np.column_stack([np.asarray(x, float), np.asarray(y, float)])
    have = (lab >= 0) & np.isfinite(pos).all(axis=1)
    need = (lab < 0) & np.isfinite(pos).all(axis=1)
    if have.any() and need.any():
        _, j = cKDTree(pos[have]).query(pos[need], k=1)
        lab[need] = lab[have][j]
    return lab
