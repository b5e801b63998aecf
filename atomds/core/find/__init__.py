"""Atom finding by template correlation, one stage per module (pure NumPy/SciPy/scikit-learn/numba).

======================  =============================================================================
:mod:`.api`             :func:`find_atoms`, the pipeline of the stages below, and :class:`FoundAtoms`
:mod:`.polarity`        bright or dark columns, decided from the image (``contrast="auto"``)
:mod:`.contrast`        local background where thickness or a support varies more than the columns
:mod:`.templates`       the template: built from the image, cut around a point, given, or per class
:mod:`.correlation`     zero-normalised cross-correlation map and z-score (FFT, compiled window sums)
:mod:`.significance`    noise z-score thresholds and the automatic correlation threshold
:mod:`.blobs`           blobs of the thresholded map, their seeds; size, contrast and breadth filters
:mod:`.lattice`         lattice tests: on a site of the clear columns' lattice, disordered regions
:mod:`.residual`        dim columns in the residual of the fitted model of the columns found
:mod:`.classes`         classes of columns (sublattices) by a Gaussian mixture or k-means
:mod:`.constants`       the tuned constants of all of them, named and commented
======================  =============================================================================

The image's scales (noise, spacing, column width) are in :mod:`atomds.core.scales`. The public
functions of every stage are importable from here, as they were from the former ``find`` module.
"""

from __future__ import annotations

from ..scales import candidate_peaks, default_half_size, estimate_column_sigma
from .api import FoundAtoms, find_atoms
from .classes import classify_columns
from .correlation import correlation_map
from .lattice import supported_by_lattice
from .significance import auto_threshold, noise_z_threshold
from .templates import auto_template, check_template, template_from_point

__all__ = [
    "FoundAtoms",
    "estimate_column_sigma",
    "default_half_size",
    "candidate_peaks",
    "auto_template",
    "template_from_point",
    "check_template",
    "correlation_map",
    "auto_threshold",
    "classify_columns",
    "noise_z_threshold",
    "supported_by_lattice",
    "find_atoms",
]
