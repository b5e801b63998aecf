"""Atom finding by template correlation: :func:`find_atoms`, a pipeline of the stages of this package.

The local method of Belianinov et al. (the paper's steps 1-2): a template (one representative
atomic column with its typical surroundings) is correlated with the whole image; the
zero-normalised cross-correlation map is thresholded; connected blobs whose size is plausible
become atoms, at their correlation-weighted centroids. The stages, one module each:
:mod:`~atomds.core.scales` (noise, spacing, column width), :mod:`.templates`,
:mod:`.correlation`, :mod:`.significance`, :mod:`.blobs`, :mod:`.classes` and :mod:`.lattice`;
their tuned constants are in :mod:`.constants`.

Everything is vectorised over pixels and blobs. Positions are in pixels (``x`` = column index,
``y`` = row index, pixel centres at integers).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ...errors import InvalidImageError, InvalidParameterError, NoAtomsFoundError
from ..image import CONTRAST_CHOICES, CONTRASTS, central_crop, check_image, constant_border, intensity_scale, turn_over
from ..scales import (
    IMMERKAER,
    SMALL_CROP,
    PatchSampler,
    column_sigma,
    correlation_suspected,
    image_scales,
    noise_model,
    pixel_correlation_hint,
)
from ..scanlines import bad_lines, fill_lines, line_means, lines_record, remove_row_offsets
from ..spikes import remove_spikes, spike_record
from .blobs import Blobs, area_bounds, find_blobs, local_reference, too_broad, unresolved
from .classes import classify_columns, column_classes, final_labels
from .constants import (
    CLASS_ON_SITES,
    FAINT_MAX_FRACTION,
    GLOBAL_REFERENCE_FLOOR,
    MIN_INTERIOR_FIT,
    MIN_LATTICE_ANCHORS,
    NEIGHBOUR_SHARE,
    THRESHOLD_FLOOR_FLATTENED,
    UNRESOLVED_WIDTHS,
)
from .contrast import flatten_local
from .correlation import amplitudes_at, best_correlation
from .lattice import (
    faint_off_lattice,
    like_neighbours,
    outside_lattice,
    real_columns,
    small_real_columns,
    sub_threshold_on_sites,
    supported_by_lattice,
)
from .polarity import Polarity, column_polarity
from .residual import ResidualColumns, interior, like_a_class, residual_passes, self_supported
from .significance import auto_threshold, border_strip, lowered_z_thresholds, peak_sample, z_thresholds
from .templates import check_template, class_templates, is_point, make_templates

__all__ = ["FoundAtoms", "find_atoms"]


@dataclass
class FoundAtoms:
    """Result of :func:`find_atoms` (positions in px)."""

    x: np.ndarray  #: seed x (column index), px
    y: np.ndarray  #: seed y (row index), px
    score: np.ndarray  #: peak zero-normalised correlation in the blob, in [-1, 1]
    area: np.ndarray  #: blob area, px^2 (pixel count)
    sublattice: np.ndarray  #: sublattice label (0, 1, ...), int
    zscore: np.ndarray  #: template amplitude at the peak over its noise (dimensionless)
    amplitude: np.ndarray  #: template-fit amplitude at the peak (intensity units, relative)
    correlation: np.ndarray  #: correlation map (maximum over the templates), float32 (ny, nx)
    templates: list = field(default_factory=list)  #: templates used (float arrays)
    params: dict[str, Any] = field(default_factory=dict)  #: parameters actually used

    def take(self, keep: np.ndarray) -> FoundAtoms:
        """The atoms selected by ``keep`` (a boolean mask or indices); the maps and params are shared."""
        return FoundAtoms(x=self.x[keep], y=self.y[keep], score=self.score[keep], area=self.area[keep],
                          sublattice=self.sublattice[keep], zscore=self.zscore[keep], amplitude=self.amplitude[keep],
                          correlation=self.correlation, templates=self.templates, params=self.params)

    def __len__(self) -> int:
        return int(self.x.size)

    def in_units(self, k: float, own: list[bool]) -> FoundAtoms:
        """This result, found on ``image / k``, in the units of ``image`` (``k`` a power of two; in place).

        The amplitudes, the templates built from the image (``own``: one flag per template; a
        template given as an array is the user's and stays as given), the noise model
        (``a`` by ``k**2``, ``b`` by ``k``) and the local background's range are multiplied back;
        ``params["intensity_scale"]`` records ``k``.
        """
        if k == 1.0:
            return self
        a, b = self.params["noise_variance"]
        self.params["noise_variance"] = [float(a) * k * k, float(b) * k]
        lb = self.params.get("local_background", {})
        if "background_range" in lb:
            lb["background_range"] = float(lb["background_range"]) * k
        ln = self.params.get("line_noise", {})
        if "rms" in ln:
            ln["rms"] = float(ln["rms"]) * k
        self.params["intensity_scale"] = k
        self.amplitude = self.amplitude * k
        self.templates = [t * k if mine else t for t, mine in zip(self.templates, own, strict=True)]
        return self


def find_atoms(image, *, template=None, threshold: float | None = None, min_area: float | None = None,
               max_area: float | None = None, sublattices: str | int | None = "auto", sigma: float | None = None,
               spacing: float | None = None, z_min: float | None = None, min_contrast: float = 0.25,
               workers: int | None = None, refine_templates: bool = True, lattice_check: bool = True,
               contrast: str = "auto", residual: bool = True) -> FoundAtoms:
    """Find atomic columns by zero-normalised template correlation.

    Pipeline (every step vectorised over pixels or blobs):

    Before everything: single-pixel spikes are replaced by the median of their neighbours
    (:func:`~atomds.core.spikes.remove_spikes`; their pixels, up to
    :data:`~atomds.core.spikes.SPIKES_RECORDED` of them, recorded under ``params["spike_pixels"]``,
    None with more), whole scan lines spoiled by a glitch by the lines on either side
    (:func:`~atomds.core.scanlines.bad_lines`; recorded under ``params["bad_lines"]``), and line
    noise, each slow-scan line offset by its own amount, is taken off the rows where it is seen
    (:func:`~atomds.core.scanlines.remove_row_offsets`; recorded under ``params["line_noise"]``; the
    noise model is then estimated again on the corrected image).

    0. Local contrast: when the background varies over the image by more than half the columns'
       contrast (thickness profiles, particles on a support, steps, gradients), the envelope of
       the valleys between the columns, a grey opening a little wider than half the lattice
       period, is removed first and the z-scores are corrected back to the recorded image's noise
       (:func:`~atomds.core.find.contrast.flatten_local`; recorded under
       ``params["local_background"]``). Other images are found as they are.
    1. Scales: nearest-neighbour column spacing (:func:`~atomds.core.scales.estimate_spacing`)
       and column width (:func:`~atomds.core.scales.estimate_column_sigma`), px, unless given; the noise model
       ``variance = a + b * intensity`` (:func:`~atomds.core.scales.noise_model`).
    2. Template(s): ``None`` builds one from the image (:func:`~atomds.core.find.templates.auto_template`); an ``(x, y)``
       pair (px) takes the patch around that atom (:func:`~atomds.core.find.templates.template_from_point`); an array is
       used as is; a list of those gives several templates, one sublattice each.
    3. Correlation map (:func:`~atomds.core.find.correlation.correlation_map`; with several templates the maximum over them)
       and the z-score of the template amplitude against the noise model.
    4. Threshold: ``threshold`` or automatic (:func:`~atomds.core.find.significance.auto_threshold`); connected blobs above
       it (:func:`scipy.ndimage.label`); a blob holding several correlation maxima more than
       half a spacing apart is split between them (each pixel to its nearest maximum).
    5. A blob is an atom when

       - its amplitude is significant: z-score >= ``z_min`` (default: the level that pure
         noise exceeds at about 0.5 local maximum over the area not taken by clearly
         significant columns, :func:`~atomds.core.find.significance.noise_z_threshold`; the strip within half a template of
         the border, where windows are partial and real columns score lower, gets its own
         budget of 0.25 and so a lower threshold);
         A blob below that threshold but still ``Z_FLOOR`` (2) sd above the noise is kept when
         it sits on a lattice site surrounded by significant columns (at least three at local
         lattice vectors, :func:`~atomds.core.find.lattice.supported_by_lattice`; only with ``lattice_check`` and the
         automatic ``z_min``): in a dense lattice near the noise limit real columns fall below
         a threshold set for empty areas, and the threshold itself is lowered, in up to four
         rounds, as the accepted columns leave less area where noise alone could make a blob;
       - its area lies within ``[min_area, max_area]`` px (automatic from the histogram of log
         areas unless given);
       - its amplitude (template fit at the peak, in intensity units) is at least
         ``min_contrast`` of the bright columns around it (the 90th percentile of the amplitudes
         in a box of about six spacings, or half the image-wide one if larger): weak specks of
         amorphous material are not columns. A weaker blob is kept all the same when it sits on
         the lattice of the others (two of them at local lattice vectors, followed along runs,
         :func:`~atomds.core.find.lattice.supported_by_lattice`; with ``lattice_check``) and is at
         least ``NEIGHBOUR_SHARE`` (0.5, or ``min_contrast`` if larger) of the median of its four
         nearest clear columns (:func:`~atomds.core.find.lattice.like_neighbours`): the thin edge
         of a crystal wedge or a particle (counted under
         ``params["rejected"]["kept_low_contrast"]``);
       - it is not a faint blob off the lattice (``lattice_check``): a blob whose amplitude
         relative to the bright columns around it is below half the median of its class must
         sit where the lattice of its neighbours puts a site, i.e. at least two of the accepted
         columns within 1.5 spacings must lie at a local lattice vector from it (within 0.15
         spacing; see :func:`~atomds.core.find.lattice.supported_by_lattice`). Amorphous specks and dim blobs in a hole
         sit anywhere; dim real columns (thin edges, light or partly occupied columns) sit on
         sites. Blobs within half a template of the border are not tested, and neither are
         faint blobs that make up more than a tenth of the blobs (a population, not specks).
       - a real column is kept wherever it sits: a blob that these lattice tests (or the
         lower area bound) would drop stays when its single-column peak height is not
         significantly below 0.6 of the median of its species nearby (and significantly above
         0.4 of it) and its shape is a column's (:func:`~atomds.core.find.lattice.real_columns`):
         grain boundaries, dislocation cores and crystal-amorphous interfaces keep their
         columns (counted under ``params["rejected"]["kept_off_lattice"]`` and ``["kept_small"]``).
       - it is not a weak, broad blob: when its amplitude is below 75 % of its class's median
         (step 7), the ratio of its correlation with the template to that with the template
         blurred by the column width (a shape measure that noise hardly changes) must not fall
         below the class's median ratio minus max(0.08, 5 robust standard deviations). Diffuse
         amorphous blobs fail; strong columns sitting on diffuse material and blobs within half
         a template of the border (partial windows) are not tested.
    6. Seeds: correlation-weighted centroids of the blobs (weights ``C - threshold``). A column
       centred just outside the image whose visible part correlates well enough is reported at
       the border (its true centre cannot be told from a partial column at the edge).
    7. Sublattice: with several templates, the best-matching template; with one template and
       ``sublattices="auto"``, distinct classes of column intensity (template amplitude relative
       to the local bright columns) by a Gaussian mixture with a separation test (one class unless
       clearly distinct, :func:`~atomds.core.find.classes.classify_columns`). A class other than
       the brightest whose members mostly sit at no offset from the bright columns that others
       share (amorphous specks, a hole's rim) is not a sublattice: those of its blobs join the
       bright class and its lattice tests (counted under ``params["rejected"]["classes_off_sites"]``,
       and ``params["first_pass"]["classes_off_sites"]`` after a second pass; a lattice test,
       skipped with ``lattice_check=False``). An int forces that many classes (k-means);
       ``None`` gives every atom 0. Label 0 is the brightest class.
    8. With the automatic template, ``sublattices="auto"`` and several classes found (and
       ``refine_templates``), the search runs once more with one template per class, each the
       average of its class's clearest columns: a dim column is then matched by a template
       with its own surroundings, which finds the dim sublattice at lower doses.
    9. Residual passes (``residual``, with the automatic template and at least
       ``MIN_LATTICE_ANCHORS`` columns; :func:`~atomds.core.find.residual.residual_passes`): the
       columns found are fitted (each in its window, neighbours subtracted), their model is
       subtracted and the residual searched with a matched filter of the column width against
       the image's noise. A maximum is a new column when it stands out by the noise threshold,
       at least two widths from every column, and either shares its offset to the nearest
       column with many others (a sublattice of its own) or sits on a site that the lattice's
       translations predict (columns of its own kind at ``p + T``); on such a site 3 noise sd
       suffice (few places are tested). Near the border a maximum may be the tail of a column
       outside the image: it stays when its own fit puts the centre inside the image with an
       intensity above 3 standard errors, or when it sits on a translation site inside the
       image. The columns centred just outside the image are in the model subtracted: the
       lattice of the columns near the border predicts them
       (:func:`~atomds.core.find.residual.outside_columns`), so that their tails neither make
       maxima nor hide the dim columns along the border. A maximum closer than 0.4 of the nearest-column
       distance to a column stays only when a joint fit with the columns around keeps its
       intensity above 5 standard errors (the shoulders that scan jitter leaves beside every
       column are not a sublattice). Near the border the matched filter's noise counts only the
       part of the template inside the image. Each pass also looks for a dense dim sublattice,
       too faint column by column for the matched filter (whose zero-mean template takes the
       tails of a column's dim neighbours for background; :func:`~atomds.core.find.residual.sublattice_sites`):
       the offsets from the columns found that many of the residual's maxima from 3 sd up share
       give sites, which are fitted jointly with the columns around them and kept from 3
       standard errors of intensity, where the offset's sites read positive in the matched
       filter on average (over the image, or over neighbourhoods of 25 sites, for a sublattice
       over part of it) and a patch of them passes the same fit (not where the columns are
       elliptical, whose lobes sit at two offsets from every column). Where the first pass finds
       candidates, the image's column profile is fitted to it
       (:func:`~atomds.core.find.residual.profile_tails`: a mixture of centred Gaussians of positive
       weights, times each column's fitted intensity, with the bright maxima not found yet left out),
       and where what one Gaussian per column leaves of that profile (a probe's long tails) could
       make or hide a maximum (2 noise sd in the matched filter) and taking it off does not give the
       first pass more candidates than the square root of their count, it is taken off the image
       the passes search: long-tailed columns fitted one Gaussian each leave 2-5 % of a column piled between
       neighbours, at the same offsets from every column, which passed for a sublattice (a
       perovskite of Moffat columns at 100,000 counts: 218 false columns, now 0). A profile that
       falls from its centre cannot draw a faint sublattice, which stays in the residual. The
       profile's weights, its tails' matched-filter level and whether they were taken off are in
       ``params["residual"]["tails"]``. Fit, subtraction and search repeat up to three times; a handful of new columns (under a tenth of those found)
       stay only when as bright as a class found (``KEEP_AMPLITUDE`` of the dimmest class's
       median) or when they are a sublattice's sites, and more of them, a sublattice of their
       own, keep those at the lattice's edge only when as bright as a class, the new columns
       inside the lattice being one (amorphous blobs on the rim of a hole sit on the sites one
       row beyond the lattice). Then every column is classed again by
       its fitted amplitude (``sublattices="auto"``), so that a species found in both passes
       shares one label; new columns have ``area`` NaN (no blob). On a large image the passes
       run only when a pass over the central crop finds columns. Recorded under
       ``params["residual"]``.

       Limit, measured (``benchmarks/bench_dim_species.py --seeds 2 --size 384``: honeycomb,
       B displaced, A-B 9 px, and perovskite [001], sigma 2 px; lowest recall % of the dim
       species over two seeds, honeycomb / perovskite, with the dim column's matched-filter SNR
       ``counts / sqrt(counts + background counts within 4 pi sigma^2)``):

       ==========  ===============  ===============  =============  ===========  ===========
       dim peak    dose 250         dose 500         dose 1000      dose 2000    dose 4000
       ==========  ===============  ===============  =============  ===========  ===========
       0.15        0 / 48 (3.9)     96 / 98 (5.5)    98.7 / 100     100 / 100    100 / 100
       0.20        77 / 81 (4.8)    99.6 / 98 (6.9)  99.9 / 100     100 / 100    100 / 100
       0.30        95.2 / 99.5      99.6 / 100       100 / 100      100 / 100    100 / 100
       0.40        99.6 / 100       100 / 100        100 / 100      100 / 100    100 / 100
       0.60        100 / 100        100 / 100        100 / 100      100 / 100    100 / 100
       ==========  ===============  ===============  =============  ===========  ===========

       (commit 38b035f; SNR of a dim column: 0.15: 3.9, 5.5, 7.7, 11, 15.5 across the doses;
       0.2: 4.8 ... 19.4; 0.3: 6.5, 9.3, ...; 0.4: 8.0, 11.3, ...; 0.6: 10.4, ...). A dim
       species is found at >= 99.5 % from an SNR of 8.0 beside brighter columns a few widths
       away (honeycomb) and from 7.7 on a perovskite [001]; below, recall falls (SNR 6.9:
       98.4-99.6 %, 5.5: 96-98 %, 3.9: 0-48 %). False positives: at most 0.07 % where the SNR
       is at least 8, up to 0.86 % below it (noise maxima on empty sites). A dense dim
       sublattice, its columns 3.8 widths from each other (a hexagonal lattice 8 px apart whose
       rows are in turn 1.0, 0.36 and 0.27 of the peak, 500 counts, 224^2 px, four seeds: SNR
       11.1 and 9.2), is found at 97.0-99.7 % and 95.5-97.7 % (there were 26-90 % and 0-18 %
       before the sites of :func:`~atomds.core.find.residual.sublattice_sites`), short of
       99.5 %: its sites one row from the border or a hole's rim are not judged, and a joint
       fit reads these columns at a median 5.6 standard errors, with some below 3. The same
       rows dim over the left 40 % of the image only: 98-100 % and 92-97.5 %; over a disc of
       radius 70 px: 100 % and 98.9-100 % (two seeds). Dim columns (0.3, 1000 counts) at the cells' centres of a square
       lattice 8 px apart, width 1.9 px, only within a disc: radius 40 px (78 sites beside about
       1000 bright columns): 100 %; radius 70 px (about 240 sites): 76 %, the residual reading
       like columns around only 28 of them, the others reached from there.

    Parameters
    ----------
    image : 2-D array
    template : None, array, (x, y) in px, or list of those
    threshold : float in (-1, 1), optional
        Correlation threshold of the blobs.
    min_area, max_area : float, optional
        Blob-size bounds, px (pixel counts).
    sublattices : "auto", int or None
    sigma, spacing : float, optional
        Column width and nearest-neighbour spacing, px (estimated when None).
    z_min : float, optional
        Significance of a column's amplitude against the noise (in noise standard deviations).
        When None (automatic), noise correlated between pixels is also looked for once the first
        columns are judged (:func:`correlated_noise`): where it is found, the noise model is scaled
        by the matched filters' variance factor and the blobs are judged again
        (``params["noise_correlation"]``; ``params["noise_variance"]`` stays the pixels' own
        model). A given ``z_min`` is kept as it is.
    min_contrast : float
        Smallest amplitude of an atom relative to the bright columns around it (0 disables).
    workers : int, optional
        Threads for the correlation's tiles (default: all the cores, at most ``NUMBA_NUM_THREADS``;
        more are not used).
    refine_templates : bool
        Allow the second pass of step 8.
    contrast : {"auto", "bright", "dark"}
        "bright": columns brighter than their surroundings (HAADF, STM topography); "dark":
        darker (ABF, BF): the image is turned over (``max - image``) before everything else.
        "auto" (default): decided from the image (:func:`~atomds.core.find.polarity.column_polarity`:
        the sign of the skewness of its lattice part, the Fourier reflections alone), recorded
        as ``params["contrast"]`` (the contrast used) and ``params["contrast_auto"]`` (the
        measurements); an image that does not tell (no lattice reflections, skewness near zero)
        is taken as bright, with the fallback ``"contrast_undecided"`` recorded.
    lattice_check : bool
        Use the lattice of the clear columns (step 5): keep sub-threshold blobs on its sites,
        drop faint blobs off its sites and weak blobs in disordered regions of their own. Turn
        it off to keep faint off-lattice features such as adatoms or interstitials.

    Returns
    -------
    FoundAtoms
        ``params`` holds every parameter used (given or estimated) and, under ``"fallbacks"``
        (only when one was taken), ``{kind: message}`` for each path taken because the preferred
        one could not be: ``"second_pass_skipped"`` (no template could be built for every class)
        and ``"second_pass_failed"`` (the per-class search found nothing; the first pass is
        returned). The xarray layer warns once per kind. An image whose values spread outside
        :data:`~atomds.core.image.INTENSITY_BAND` is found divided by a power of two
        (:func:`~atomds.core.image.intensity_scale`, recorded as ``params["intensity_scale"]``);
        amplitudes, templates and the noise model are given back in the image's units.

    Raises
    ------
    DimensionError
        The image is not 2-D.
    InvalidImageError
        The image holds NaN/inf or is constant, or no column spacing can be found in it.
    InvalidParameterError
        A parameter is out of range, or a template is constant or not smaller than the image.
    NoAtomsFoundError
        No blob passed; the message gives the threshold used and what to try.
    """
    arr = check_image(image)
    window = _data_window(arr)
    if window is not None:
        # rows and columns of one value at the border (the zero padding of a drift-corrected sum) hold no
        # data: the image is found without them, and the padding's edge is the image's border
        t, b, l, r = window
        inner = find_atoms(arr[t : arr.shape[0] - b, l : arr.shape[1] - r], template=_shifted(template, -l, -t),
                           threshold=threshold, min_area=min_area, max_area=max_area, sublattices=sublattices,
                           sigma=sigma, spacing=spacing, z_min=z_min, min_contrast=min_contrast, workers=workers,
                           refine_templates=refine_templates, lattice_check=lattice_check, contrast=contrast,
                           residual=residual)
        return _in_window(inner, window, arr.shape)
    # values far from order one (currents in A, heights in m, 1e9 counts) are found on the image
    # divided by a power of two, so that no absolute floor decides; results in the image's units
    k = intensity_scale(arr)
    if k != 1.0:
        arr = arr / k
    contrast, polarity, img, noise = _contrast_and_noise(arr, contrast)
    # hot and dead pixels would pass for the clearest columns and set the scales: replaced by
    # the median of their neighbours for finding (refinement leaves them out of its fits)
    img, spikes = remove_spikes(img, noise=noise)
    _check_arguments(threshold, min_area, max_area, sigma, spacing, z_min, min_contrast, sublattices)
    specs = _template_specs(template, img.shape)
    despiked = img
    unchanged = False
    pool = ThreadPoolExecutor(max_workers=1)
    # the scales of the image as it is now, read on another core while the lines and the local
    # background are looked at: used where neither changes the image (the usual case)
    early = pool.submit(_scales, despiked, specs, sigma, spacing)
    try:
        # whole scan lines spoiled by a glitch are ridges or trenches the correlation would break into
        # "columns": filled from the lines on either side for finding (refinement leaves them out)
        means = line_means(img)
        bad_rows, bad_cols = bad_lines(img, means=means)
        filled = fill_lines(img, bad_rows, bad_cols)
        # line noise (every slow-scan line offset by its own amount) is streaks the correlation breaks
        # into "columns" and a noise the model of independent pixels does not hold: taken off the rows
        img, line_noise = remove_row_offsets(filled, means=means if filled is img else None)
        if line_noise["applied"]:
            noise = noise_model(img)
        # local contrast: a background that varies more than the columns do (thickness, particles on
        # a support, gradients) is removed first; the noise model stays that of the recorded image
        flat = flatten_local(img, spacing=spacing)
        unchanged = flat.image is despiked
    finally:
        if not unchanged:  # not wanted: stopped if it has not started, else waited for (no thread outlives the call)
            early.cancel()
        pool.shutdown(wait=True)
    d, s, period, samp = early.result() if unchanged else _scales(flat.image, specs, sigma, spacing)
    templates, kinds = make_templates(flat.image, specs, samp, s, d)
    ncc, z, which = best_correlation(flat.image, templates, noise, workers=workers)
    z = flat.zscore(z, noise, templates)

    def judged(zmap: np.ndarray, counts: dict[str, int]):
        """Steps 4-7 on a z-score map: the significant blobs, their plausible sizes, the columns among them."""
        stages = _significant_blobs(ncc, zmap, which, templates, d, threshold, z_min, lattice_check, counts,
                                    flat.params["applied"])
        sized = _plausible_size(stages[0], stages[1], min_area, max_area, stages[2], counts, flat.image, s)
        return stages, sized, _columns(flat.image, sized[0], templates, s, d, min_contrast, sublattices,
                                       lattice_check, counts)

    counts: dict[str, int] = {}
    (_, keep, thr, zmin, zmin_edge), (blobs, lo, hi), (ok, amp, cls, mode) = judged(z, counts)
    if not np.any(ok):
        raise thr.no_atoms("every blob is too weak or too broad to be a column")
    # noise correlated between pixels (afterglow, interpolation, smoothing) is more noise at a
    # column's scale than the model read at the pixels' scale: the significance is judged again
    pixel_noise = correlated_noise(img, blobs.x[ok], blobs.y[ok], s, templates) if z_min is None else None
    recorded_noise = noise  # the pixels' own model, as read; any correlation is in pixel_noise
    if pixel_noise is not None and pixel_noise["applied"]:
        q = float(pixel_noise["variance_factor"])
        counts_q: dict[str, int] = {}
        try:
            again = judged(z / np.float32(np.sqrt(q)), counts_q)
        except NoAtomsFoundError:
            again = None
        if again is None or not np.any(again[2][0]):
            # nothing would stand the noise so scaled: the first judgement stands, and says so
            pixel_noise.update(applied=False, note="no column stood the noise scaled by it; not applied")
        else:
            noise = (noise[0] * q, noise[1] * q)
            (_, keep, thr, zmin, zmin_edge), (blobs, lo, hi), (ok, amp, cls, mode) = again
            counts = counts_q
    blobs, amp, sub = blobs.take(ok), amp[ok], final_labels(cls[ok], mode)
    n_sub = int(sub.max()) + 1 if sub.size else 0
    params = {
        "threshold": thr.value, "threshold_auto": thr.auto, "min_area": lo, "max_area": hi, "z_min": zmin,
        "z_min_border": zmin_edge, "min_contrast": float(min_contrast), "lattice_check": bool(lattice_check),
        "contrast": contrast, "spikes": int(np.count_nonzero(spikes)), "spike_pixels": spike_record(spikes),
        "bad_lines": lines_record(bad_rows, bad_cols), "line_noise": line_noise, "sigma": s,
        "spacing": d, "period": period,
        "noise_variance": [float(v) for v in recorded_noise], "templates": kinds,
        "template_shape": [list(t.shape) for t in templates], "sublattice_mode": mode, "n_sublattices": n_sub,
        "rejected": counts, "local_background": flat.params,
    }
    if pixel_noise is not None:
        params["noise_correlation"] = pixel_noise
    if polarity is not None:
        _record_polarity(params, polarity)
    result = FoundAtoms(x=blobs.x, y=blobs.y, score=blobs.score, area=blobs.area, sublattice=sub, zscore=blobs.zscore,
                        amplitude=amp, correlation=ncc, templates=templates, params=params)
    if mode == "auto" and n_sub > 1 and kinds == ["auto"] and refine_templates:
        # img is already turned over (dark contrast) and free of spikes: bright columns
        result = _second_pass(img, result, dict(threshold=threshold, min_area=min_area, max_area=max_area, z_min=z_min,
                                                min_contrast=min_contrast, workers=workers, lattice_check=lattice_check))
    if residual and refine_templates and len(result) >= MIN_LATTICE_ANCHORS:
        result = _residual_stage(img, result, noise, lattice_check, sublattices)
        result = _without_unresolved(result)
    result = _without_no_data(result, img)
    own = [kind != "array" for kind in kinds] if len(kinds) == len(result.templates) else [True] * len(result.templates)
    return result.in_units(k, own)


#: Where the matched filter's noise variance is at least this many times what the model says, the
#: model is scaled by it and the significance judged again ...
NOISE_FACTOR_MIN = 1.2
#: ... by at most this many times (a Gaussian filter of 0.7 px read 59 and 62) ...
MAX_NOISE_FACTOR = 200.0
#: ... and only where Immerkaer's high-pass keeps at least this share of the noise variance of
#: independent pixels (0.059 for the correlation of a Gaussian filter of 0.7 px, computed to 3 px):
#: below it the ratio rests on almost nothing.
MIN_HIGHPASS_SHARE = 0.01


def correlated_noise(img: np.ndarray, x: np.ndarray, y: np.ndarray, sigma: float, templates) -> dict[str, Any]:
    """How many times the noise variance of the templates' matched filters exceeds the noise model's,
    for noise correlated between pixels; a record for ``find_atoms_params["noise_correlation"]``.

    The model (:func:`~atomds.core.scales.noise_model`) reads the noise with Immerkaer's high-pass,
    as for independent pixels. Where the cheap hint says the pixels may be correlated, the columns
    ``x, y`` (px) found so far are fitted (:func:`atomds.core.refine.estimate_fit_settings`) and the
    correlation ``rho`` read from their residuals (:func:`atomds.core.refine.settings.noise_correlation`);
    where it looks like that of pixels, the factor is, for the zero-mean template ``t`` whose noise
    grows most, ``sum rho R_t / R_t(0)`` over the same for Immerkaer's kernel (``R`` the kernels'
    autocorrelation), at most :data:`MAX_NOISE_FACTOR`. Returns ``{"hint": [x, y], "variance_factor": q,
    "applied": q >= NOISE_FACTOR_MIN}``, ``read`` (whether the residuals were read) and, where they
    were, ``rho_next_pixel`` (the correlation with the next pixel along x and along y).
    """
    hint = pixel_correlation_hint(img)
    rec: dict[str, Any] = {"hint": list(hint), "variance_factor": 1.0, "applied": False}
    from ..refine import estimate_fit_settings
    from ..refine.correlation import filter_variance
    from ..refine.settings import CORRELATION_MIN_COLUMNS  # the fits' own minimum of typical columns

    if not correlation_suspected(hint) or np.size(x) < CORRELATION_MIN_COLUMNS:
        return rec

    corr = estimate_fit_settings(img, x, y, sigma=sigma).get("noise_correlation") or {}
    rec["read"] = bool(corr.get("read"))
    if not corr.get("applied"):
        return rec
    rho = np.asarray(corr["rho"], dtype=np.float64)
    high = filter_variance(rho, IMMERKAER)
    if not high >= MIN_HIGHPASS_SHARE:  # the high-pass holds almost no noise: the ratio is not defined
        rec["note"] = f"Immerkaer's share of the noise {high:.3g} below {MIN_HIGHPASS_SHARE}; not applied"
        return rec
    q = max(filter_variance(rho, np.asarray(t, np.float64) - np.mean(t)) for t in templates) / high
    q = min(q, MAX_NOISE_FACTOR)
    L = rho.shape[0] // 2
    rec.update(variance_factor=round(float(q), 4), applied=bool(q >= NOISE_FACTOR_MIN),
               rho_next_pixel=[round(float(rho[L, L + 1]), 4), round(float(rho[L + 1, L]), 4)])
    return rec


#: A border of constant rows and columns is cut off only when at least this many px remain each way.
MIN_WINDOW = 32


def _data_window(arr: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(top, bottom, left, right)`` of the constant border (:func:`~atomds.core.image.constant_border`)
    when there is one and at least :data:`MIN_WINDOW` px remain each way, else None."""
    t, b, l, r = constant_border(arr)
    ny, nx = arr.shape
    if not (t or b or l or r) or ny - t - b < MIN_WINDOW or nx - l - r < MIN_WINDOW:
        return None
    return t, b, l, r


def _shifted(template, dx: float, dy: float):
    """The template specification with its ``(x, y)`` points moved by ``(dx, dy)`` px (arrays as they are)."""
    if isinstance(template, list):
        return [_shifted(t, dx, dy) for t in template]
    if template is not None and is_point(template):
        return (float(template[0]) + dx, float(template[1]) + dy)
    return template


def _in_window(found: FoundAtoms, window: tuple[int, int, int, int], shape: tuple[int, int]) -> FoundAtoms:
    """``found`` (on the image less its constant border) in the pixels of the whole image: positions, the
    correlation map (0 on the border), the spikes and bad lines; ``params["data_window"]`` records the border."""
    t, b, l, r = window
    found.x, found.y = found.x + l, found.y + t
    found.correlation = np.pad(found.correlation, ((t, b), (l, r)))
    p = found.params
    if p.get("spike_pixels") is not None:
        p["spike_pixels"] = [[int(i) + t, int(j) + l] for i, j in p["spike_pixels"]]
    lines = p.get("bad_lines")
    if isinstance(lines, dict) and "rows" in lines:
        lines["rows"] = [int(i) + t for i in lines["rows"]]
        lines["columns"] = [int(j) + l for j in lines["columns"]]
    p["data_window"] = {"top": t, "bottom": b, "left": l, "right": r, "shape": [int(shape[0]), int(shape[1])],
                        "note": "rows and columns of one value at the border (padding) were left out"}
    return found


def on_constant_pixels(image: np.ndarray, x, y) -> np.ndarray:
    """Whether each position ``(x, y)`` (px) lies where the image is constant over the 3 x 3 pixels
    around its nearest pixel: no data there (the zero padding of a drift-corrected sum, vacuum
    clipped at the detector's zero), since a recorded pixel always carries noise."""
    img = np.asarray(image)
    ny, nx = img.shape
    if np.size(x) == 0:
        return np.zeros(0, dtype=bool)
    iy = np.clip(np.rint(np.asarray(y, dtype=np.float64)).astype(np.int64), 0, ny - 1)
    ix = np.clip(np.rint(np.asarray(x, dtype=np.float64)).astype(np.int64), 0, nx - 1)
    centre = img[iy, ix]
    same = np.ones(iy.size, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= img[np.clip(iy + dy, 0, ny - 1), np.clip(ix + dx, 0, nx - 1)] == centre
    return same


def _without_no_data(found: FoundAtoms, img: np.ndarray) -> FoundAtoms:
    """``found`` less the atoms centred on constant pixels (:func:`on_constant_pixels`), counted under
    ``params["rejected"]["no_data"]``. Beside the zero padding of a drift-corrected sum the matched
    filter of the residual passes answered to the step and put 99 columns in the padding of a 512^2
    image."""
    bad = on_constant_pixels(img, found.x, found.y)
    found.params.setdefault("rejected", {})["no_data"] = int(bad.sum())
    return found.take(~bad) if bad.any() else found


def _without_unresolved(found: FoundAtoms) -> FoundAtoms:
    """``found`` less the residual passes' columns within ``UNRESOLVED_WIDTHS`` widths of another column.

    A column added in one round is refitted in the next, and its fit can slide onto a column
    found before (1.2 px apart on particles of columns 5 px wide); counted under
    ``params["residual"]["unresolved"]``.
    """
    new = ~np.isfinite(found.area)
    if not new.any():
        return found
    drop = unresolved(found.x, found.y, np.where(new, -1.0, found.area), found.score,
                      UNRESOLVED_WIDTHS * found.params["sigma"]) & new
    found.params.setdefault("residual", {})["unresolved"] = int(drop.sum())
    if not drop.any():
        return found
    found.params["residual"]["n_atoms"] = int((new & ~drop).sum())
    return found.take(~drop)


# --------------------------------------------------------------------------------------------
# the stages of find_atoms
# --------------------------------------------------------------------------------------------
def _check_arguments(threshold, min_area, max_area, sigma, spacing, z_min, min_contrast, sublattices) -> None:
    """Raise :class:`InvalidParameterError` for an argument of :func:`find_atoms` out of range."""
    if threshold is not None:
        if not np.isfinite(threshold) or not (-1.0 < float(threshold) < 1.0):
            raise InvalidParameterError(
                f"threshold must lie in (-1, 1) (it applies to a normalised correlation), got {threshold!r}."
            )
    for nm, v in (("min_area", min_area), ("max_area", max_area)):
        if v is not None and (not np.isfinite(v) or v < 1):
            raise InvalidParameterError(f"{nm} must be >= 1 px, got {v!r}.")
    if min_area is not None and max_area is not None and min_area > max_area:
        raise InvalidParameterError(f"min_area ({min_area}) is larger than max_area ({max_area}).")
    for nm, v in (("sigma", sigma), ("spacing", spacing)):
        if v is not None and not (np.isfinite(v) and v > 0):
            raise InvalidParameterError(f"{nm} must be > 0 px, got {v!r}.")
    if z_min is not None and not np.isfinite(z_min):
        raise InvalidParameterError(f"z_min must be a finite number, got {z_min!r}.")
    if not (np.isfinite(min_contrast) and 0 <= min_contrast < 1):
        raise InvalidParameterError(f"min_contrast must lie in [0, 1), got {min_contrast!r}.")
    if not (sublattices is None or sublattices == "auto"
            or (isinstance(sublattices, (int, np.integer)) and not isinstance(sublattices, bool) and sublattices >= 1)):
        raise InvalidParameterError(f"sublattices must be 'auto', an int >= 1 or None, got {sublattices!r}.")


def _contrast_and_noise(arr: np.ndarray, contrast: str):
    """The contrast (and the :class:`Polarity` behind an automatic one), the image turned over for it, and its
    noise model. Where the contrast is decided from the image, the noise model of the image as it is (that
    of a bright one, the usual answer) is read beside the decision, on another core."""
    if contrast != "auto":
        contrast, polarity = _decide_contrast(arr, contrast)
        img = turn_over(arr, contrast)
        return contrast, polarity, img, noise_model(img)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(noise_model, arr)
        contrast, polarity = _decide_contrast(arr, contrast)
        try:
            as_is = pending.result()
        except Exception:  # noqa: BLE001 - read again below, where it raises as it would have
            as_is = None
    img = turn_over(arr, contrast)
    return contrast, polarity, img, as_is if img is arr and as_is is not None else noise_model(img)


def _decide_contrast(image: np.ndarray, contrast: str):
    """The contrast to use (``"bright"`` or ``"dark"``) and, for ``"auto"``, the :class:`Polarity` behind it."""
    if contrast == "auto":
        pol = column_polarity(image)
        return pol.contrast, pol
    if contrast not in CONTRASTS:
        raise InvalidParameterError(f"contrast must be one of {CONTRAST_CHOICES}, got {contrast!r}.")
    return contrast, None


def _record_polarity(params: dict[str, Any], pol: Polarity) -> None:
    """Record the automatic contrast decision (and the fallback when the image did not tell) in ``params``."""
    params["contrast_auto"] = pol.as_params()
    if not pol.decided:
        params.setdefault("fallbacks", {})["contrast_undecided"] = (
            f"find_atoms: contrast='auto' could not tell bright from dark columns ({pol.reflections} lattice "
            f"reflections, skewness {pol.skewness:+.2f}); the columns were taken as bright. Pass contrast='dark' "
            "for an ABF or BF image."
        )


def _template_specs(template, shape: tuple[int, int]) -> list:
    """The template argument as a list of specifications (None, a point, an array); arrays checked."""
    specs = list(template) if isinstance(template, list) else [template]
    if len(specs) == 0:
        raise InvalidParameterError("template is an empty list: pass None, an array, an (x, y) point or a list of those.")
    for sp in specs:
        if sp is not None and not is_point(sp):
            check_template(sp, shape)
    return specs


def _scales(img: np.ndarray, specs: list, sigma: float | None,
            spacing: float | None) -> tuple[float, float, float, PatchSampler | None]:
    """Nearest-column distance, column width and lattice period (px), given or estimated, and the estimation crop.

    The period is only read (and recorded) when the distance is estimated; a given spacing is
    also taken as the period.
    """
    try:
        sc = image_scales(img) if spacing is None else None
    except InvalidImageError as exc:
        # an image with no repeated column spacing (noise, vacuum, amorphous) has no atoms to find
        raise NoAtomsFoundError(f"no atoms found: {exc}") from exc
    d = sc.distance if sc is not None else float(spacing)  # type: ignore[arg-type]  # spacing given
    period = d if sc is None else sc.period
    if sigma is not None and all(sp is not None for sp in specs):
        return d, float(sigma), period, None
    samp = PatchSampler(central_crop(img, SMALL_CROP))
    return d, column_sigma(samp, d) if sigma is None else float(sigma), period, samp


@dataclass(frozen=True)
class _Threshold:
    """The correlation threshold of the blobs and whether it was automatic."""

    value: float
    auto: bool

    def no_atoms(self, why: str) -> NoAtomsFoundError:
        """The error to raise when nothing passed, saying why and what to try."""
        how = "automatic" if self.auto else "given"
        thr = self.value
        return NoAtomsFoundError(
            f"no atoms found with the {how} correlation threshold {thr:.3f}: {why}. Try a lower threshold "
            f"(e.g. threshold={max(thr - 0.2, -0.9):.2f}), a template taken from a clear atom (template=(x, y)), "
            "wider min_area/max_area, or check that the image shows atomic columns."
        )


def _significant_blobs(ncc, z, which, templates, spacing: float, threshold: float | None, z_min: float | None,
                       lattice_check: bool, counts: dict[str, int], flattened: bool = False):
    """Blobs of the thresholded map and which of them are significant (steps 4 and 5a of :func:`find_atoms`).

    ``flattened``: a local background was removed, and the automatic threshold may go below the
    usual floor (:data:`~.constants.THRESHOLD_FLOOR_FLATTENED`).

    Returns ``(blobs, keep, threshold, z_min, z_min_border)``; rejections are counted in ``counts``.
    """
    ny, nx = ncc.shape
    hy_t, hx_t, inner_area = border_strip(ncc.shape, templates)
    if z_min is None:
        zmin, zmin_edge = z_thresholds(templates, ncc.shape, inner_area)
    else:
        zmin = zmin_edge = float(z_min)
    if threshold is None:
        c_pk, z_pk = peak_sample(ncc, z)
        thr = _Threshold(auto_threshold(c_pk, z_pk, z_min=zmin, floor=THRESHOLD_FLOOR_FLATTENED if flattened else None),
                         True)
    else:
        thr = _Threshold(float(threshold), False)
    blobs = find_blobs(ncc, z, which, thr.value, spacing)
    if blobs is None:
        raise thr.no_atoms("no pixel of the correlation map exceeds it")
    counts["blobs"] = len(blobs)
    py_, px_ = np.divmod(blobs.peak, nx)
    on_edge = (py_ < hy_t) | (py_ >= ny - hy_t) | (px_ < hx_t) | (px_ >= nx - hx_t)
    if z_min is None:
        zmin, zmin_edge = lowered_z_thresholds(templates, blobs.zscore, on_edge, zmin, zmin_edge, ncc.shape,
                                               inner_area, spacing)
    keep = blobs.zscore >= np.where(on_edge, zmin_edge, zmin)
    if lattice_check and z_min is None:
        rescued = sub_threshold_on_sites(blobs.x, blobs.y, keep, blobs.zscore, spacing)
        if rescued is not None:
            counts["on_lattice_site"] = int(np.count_nonzero(rescued))
            keep |= rescued
    counts["not_significant"] = int((~keep).sum())
    if not np.any(keep):
        raise thr.no_atoms(f"no blob has an amplitude {zmin:.1f} noise standard deviations above the noise")
    return blobs, keep, thr, zmin, zmin_edge


def _plausible_size(blobs: Blobs, keep: np.ndarray, min_area, max_area, thr: _Threshold,
                    counts: dict[str, int], img: np.ndarray, s: float) -> tuple[Blobs, int, int]:
    """The significant blobs of a plausible area (step 5b), and the area bounds (px).

    Below an automatic lower bound, a blob that is a real column by its own height and shape
    (a column off the lattice, :func:`~atomds.core.find.lattice.small_real_columns`) is kept.
    """
    lo, hi = area_bounds(blobs.area[keep], min_area, max_area)
    size_ok = (blobs.area >= lo) & (blobs.area <= hi)
    if min_area is None:
        small = small_real_columns(img, blobs.x, blobs.y, blobs.peak, keep & size_ok, keep & (blobs.area < lo), s)
        counts["kept_small"] = int(small.sum())
        size_ok |= small
    counts["area"] = int((keep & ~size_ok).sum())
    keep = keep & size_ok
    if not np.any(keep):
        raise thr.no_atoms(f"no significant blob has an area within [{lo}, {hi}] px")
    blobs = blobs.take(keep)
    frag = unresolved(blobs.x, blobs.y, blobs.area, blobs.score, UNRESOLVED_WIDTHS * s)
    counts["unresolved"] = int(frag.sum())
    return blobs.take(~frag), lo, hi


def _columns(img, blobs: Blobs, templates, s: float, d: float, min_contrast: float, sublattices, lattice_check: bool,
             counts: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Which blobs are columns (contrast, breadth, lattice: steps 5c-5e) and their classes (step 7).

    Returns ``(ok, amplitude, classes, mode)``, one entry per blob; rejections are counted in ``counts``.
    """
    ny, nx = img.shape
    cx, cy = blobs.x, blobs.y
    amp, broad = amplitudes_at(img, templates, blobs.which, blobs.peak, s)
    ok = np.ones(len(blobs), dtype=bool)
    loc_ref, glob_ref = local_reference(cx, cy, amp, d)
    if min_contrast > 0:
        weak = amp < min_contrast * np.maximum(loc_ref, GLOBAL_REFERENCE_FLOOR * glob_ref)
        counts["kept_low_contrast"] = 0
        if lattice_check and weak.any() and np.count_nonzero(~weak) >= MIN_LATTICE_ANCHORS:
            # the thin columns at the edge of a crystal wedge or a particle are a fraction of the thick
            # ones a few periods in (300 counts beside 1,000-3,000): on the lattice of the clear columns,
            # and as bright as a share of their nearest clear neighbours, they are columns, where a
            # speck of amorphous material sits anywhere (and a speck in a hole is a fraction of the
            # columns at its rim)
            on_sites = weak & supported_by_lattice(cx, cy, ~weak, d, candidates=weak)
            on_sites &= like_neighbours(cx, cy, amp, ~weak, on_sites, max(NEIGHBOUR_SHARE, min_contrast))
            counts["kept_low_contrast"] = int(on_sites.sum())
            weak &= ~on_sites
        counts["low_contrast"] = int(weak.sum())
        ok &= ~weak
    # classes of columns (intensity relative to the local bright columns); the blobs near the
    # border (tails of columns outside, partial windows) are labelled but do not shape the classes
    rel = amp / np.maximum(loc_ref, 1e-12 * abs(glob_ref) + 1e-300)
    hmax = max(max(t.shape) for t in templates) // 2
    interior = (cx >= hmax) & (cx <= nx - 1 - hmax) & (cy >= hmax) & (cy <= ny - 1 - hmax)
    fit_mask = ok & interior if np.count_nonzero(ok & interior) >= MIN_INTERIOR_FIT else ok
    cls, mode = column_classes(rel, blobs.which, len(templates), sublattices, fit_mask)
    counts["classes_off_sites"] = 0
    if lattice_check and mode == "auto" and cls.size and cls.max() > 0:  # a lattice test: off with lattice_check
        cls, counts["classes_off_sites"] = _classes_on_sites(cx, cy, cls, ok, d)
    diffuse = too_broad(blobs.score, broad, amp, cls, ok, interior)
    counts["too_broad"] = int((ok & diffuse).sum())
    ok &= ~diffuse
    if lattice_check:
        # well-formed columns as bright as their species nearby are real wherever they sit
        # (boundaries, cores, interfaces): the lattice tests only judge fainter blobs
        off = outside_lattice(cx, cy, amp, cls, ok & interior, ok, d, border=ok & ~interior)
        off_sites = faint_off_lattice(cx, cy, rel, cls, ok & ~off, interior, d)
        off_sites = np.zeros_like(off) if off_sites is None else off_sites
        real = real_columns(img, cx, cy, blobs.peak, cls, ok, off | off_sites, s)
        counts["no_lattice"] = int((off & ~real).sum())
        counts["off_lattice"] = int((off_sites & ~real).sum())
        counts["kept_off_lattice"] = int(((off | off_sites) & real).sum())
        ok &= ~((off | off_sites) & ~real)
    return ok, amp, cls, mode


def _classes_on_sites(x, y, cls: np.ndarray, ok: np.ndarray, spacing: float) -> tuple[np.ndarray, int]:
    """Classes that are sublattices: the members of each class but the brightest must mostly sit at
    offsets from the nearest bright column that many of them share (a sublattice repeats with the
    lattice). In a class where few do (an amorphous rim, specks, a hole's edge), the members that
    do not join the brightest class, whose lattice tests then judge them. (Offsets to the nearest
    bright column are short: among many blobs, random ones share them too, so the test tells a
    handful of specks, such as a hole's rim, from a sublattice, not a large amorphous area.)

    Returns the classes and the number of accepted blobs moved.
    """
    out = cls.copy()
    anchor = ok & (cls == 0)
    if anchor.sum() < MIN_LATTICE_ANCHORS:
        return out, 0
    moved = 0
    for k in range(1, int(cls.max()) + 1):
        m = np.flatnonzero(ok & (cls == k))
        if m.size == 0:
            continue
        # the share from a sample of the class (on a clean lattice thousands of offsets coincide)
        sample = _sample(m)
        if float(np.mean(self_supported(x[sample], y[sample], x[anchor], y[anchor], spacing))) < CLASS_ON_SITES:
            on = self_supported(x[m], y[m], x[anchor], y[anchor], spacing)
            moved += int(np.count_nonzero(~on))
            out[m[~on]] = 0
    return np.searchsorted(np.unique(out), out).astype(np.int64), moved


def _sample(idx: np.ndarray, n: int = 2000) -> np.ndarray:
    """At most ``n`` of the indices ``idx``, drawn reproducibly."""
    return idx if idx.size <= n else np.sort(np.random.default_rng(0).choice(idx, n, replace=False))


def _second_pass(img: np.ndarray, first: FoundAtoms, kw: dict[str, Any]) -> FoundAtoms:
    """Step 8 of :func:`find_atoms`: the search again with one template per class, built from its own columns.

    The dim sublattice is then matched by a template with its own surroundings. When no template
    can be built for every class, or the second search finds nothing, the first pass is returned
    with the fallback recorded under ``params["fallbacks"]``.
    """
    p = first.params
    flat = flatten_local(img, spacing=p["spacing"]).image  # the first pass's image, flattened as it was
    class_t = class_templates(flat, first.x, first.y, first.score, first.sublattice, first.templates[0].shape)
    if len(class_t) != p["n_sublattices"]:
        p.setdefault("fallbacks", {})["second_pass_skipped"] = (
            f"find_atoms: no template could be built for each of the {p['n_sublattices']} classes of columns (a class "
            "has too few clear columns away from the border); the atoms of the first pass (one template) are kept"
        )
        return first
    try:
        # img is already turned over: its columns are bright
        second = find_atoms(img, template=class_t, sublattices="auto", sigma=p["sigma"], spacing=p["spacing"],
                            refine_templates=False, contrast="bright", **kw)
    except NoAtomsFoundError as exc:
        p.setdefault("fallbacks", {})["second_pass_failed"] = (
            f"find_atoms: the second pass (one template per class) found no atoms ({exc}); the atoms of the first "
            "pass (one template) are kept"
        )
        return first
    second.params["contrast"] = p["contrast"]
    for key in ("contrast_auto", "fallbacks"):
        if key in p:
            second.params[key] = {**p[key], **second.params.get(key, {})}
    second.params["period"] = p["period"]
    second.params["spikes"] = p["spikes"]
    second.params["spike_pixels"] = p["spike_pixels"]
    second.params["bad_lines"] = p["bad_lines"]
    if second.params.get("line_noise", {}).get("applied"):  # the second pass's image had line noise still
        second.params["line_noise"] = {**p["line_noise"], "second_pass": second.params["line_noise"]}
    else:
        second.params["line_noise"] = p["line_noise"]
    second.params["templates"] = [f"auto (class {k})" for k in range(len(class_t))]
    second.params["sublattice_mode"] = "auto (one template per class)"
    second.params["first_pass"] = {k: p[k] for k in ("threshold", "n_sublattices")}
    second.params["first_pass"]["n_atoms"] = len(first)
    second.params["first_pass"]["classes_off_sites"] = p["rejected"].get("classes_off_sites", 0)
    return second


def _edge_like_a_class(img: np.ndarray, found: FoundAtoms, rc: ResidualColumns, p: dict,
                       noise: tuple[float, float]) -> ResidualColumns:
    """The residual columns of a sublattice of their own, less those at the lattice's edge that are no column.

    On the rim of a hole or at a particle's edge, amorphous blobs sit on the sites that the
    lattice's translations predict one row beyond its last columns. A new column there (not
    :func:`~atomds.core.find.residual.interior`: columns at ``+T`` and ``-T`` for the lattice's two
    shortest translations) is kept when it is as bright as a class
    (:func:`~atomds.core.find.residual.like_a_class`), the new columns inside the lattice being
    one class beside those found before: the dim sublattice's own rim columns are, broad dim
    blobs are not (sweep image 501933535: four such blobs in its hole once its dim rows were
    found, at z 3.3-5.1). The fits are in the order of the columns kept.
    """
    n0 = len(found)
    ax, ay = np.r_[found.x, rc.x], np.r_[found.y, rc.y]
    edge = ~interior(ax, ay, p["spacing"], img.shape)[n0:]
    inner = ~edge
    if not edge.any() or inner.sum() < MIN_LATTICE_ANCHORS:  # no class of their own to judge the edge's by
        return rc
    p["residual"]["edge"] = int(edge.sum())
    label = np.r_[found.sublattice, np.full(int(inner.sum()), int(found.sublattice.max(initial=-1)) + 1)]
    like, fit = like_a_class(img, np.r_[found.x, rc.x[inner]], np.r_[found.y, rc.y[inner]], label,
                             rc.x[edge], rc.y[edge], sigma=p["sigma"], noise=noise)
    p["residual"]["dropped"] = int((~like).sum())
    keep = np.r_[np.ones(n0 + int(inner.sum()), dtype=bool), like]
    order = np.r_[np.flatnonzero(inner), np.flatnonzero(edge)[like]]
    p["residual"]["n_atoms"] = int(order.size)
    return replace(rc, x=rc.x[order], y=rc.y[order], zscore=rc.zscore[order], at_sites=rc.at_sites[order],
                   fit={k: np.asarray(v)[keep] for k, v in fit.items() if np.size(v) == keep.size})


def _residual_stage(img: np.ndarray, found: FoundAtoms, noise: tuple[float, float], lattice_check: bool,
                    sublattices) -> FoundAtoms:
    """Step 9 of :func:`find_atoms`: dim columns found in the residual of the fitted columns, and the classes again.

    Fewer new columns than ``FAINT_MAX_FRACTION`` of those found are not a sublattice of their
    own: each is kept only when its fitted peak is not significantly below ``KEEP_AMPLITUDE`` of
    the median of the dimmest class found (:func:`~atomds.core.find.residual.like_a_class`: the
    missed members of a class), or when it is one of a sublattice's sites
    (``ResidualColumns.at_sites``: a class of its own already), the others are specks (counted under
    ``params["residual"]["dropped"]``). The passes run on the whole image only when one pass over the central estimation crop
    (``SMALL_CROP`` px) finds columns there: an image whose columns were all found costs one
    small fit. New columns get ``area`` NaN (no blob) and the correlation map's value as score;
    then every column is classed again by its fitted amplitude relative to the bright columns
    around it (``sublattices="auto"``), so that a species found in both passes shares a label.
    """
    p = found.params
    ny, nx = img.shape
    y0, x0 = max(0, (ny - SMALL_CROP) // 2), max(0, (nx - SMALL_CROP) // 2)
    crop = img[y0 : y0 + SMALL_CROP, x0 : x0 + SMALL_CROP]
    inside = (found.x >= x0) & (found.x < x0 + crop.shape[1]) & (found.y >= y0) & (found.y < y0 + crop.shape[0])
    kw = dict(sigma=p["sigma"], spacing=p["spacing"], noise=noise, lattice_check=lattice_check)
    if (ny, nx) != crop.shape:
        # the crop's edges cut columns: its border strip is not searched
        probe = residual_passes(crop, found.x[inside] - x0, found.y[inside] - y0, rounds=1, border=False, **kw)
        if probe.x.size == 0:
            p["residual"] = {"rounds": 0, "n_atoms": 0, "screened_on_crop": True}
            if probe.tails_record:
                p["residual"]["tails"] = probe.tails_record
            return found
    rc = residual_passes(img, found.x, found.y, **kw)
    p["residual"] = {"rounds": int(rc.rounds), "n_atoms": int(rc.x.size), "screened_on_crop": (ny, nx) != crop.shape}
    if rc.tails_record:
        p["residual"]["tails"] = rc.tails_record
    if rc.tails is not None:  # the new columns are judged on the image the passes searched
        img = img - rc.tails
    if rc.x.size < FAINT_MAX_FRACTION * len(found):
        # a handful of residual columns are not a sublattice of their own: each is kept when it is
        # as bright as a class already found (its missed members), else it is a speck (a hole's rim);
        # the columns of a sublattice's sites are one already (its offset stood over at least
        # MIN_LATTICE_ANCHORS sites' neighbourhoods and a joint fit): a dim sublattice over a small part
        # of the image (78 sites of 0.3 in a disc, beside 1000 columns) is not a handful of specks
        like, fit = like_a_class(img, found.x, found.y, found.sublattice, rc.x, rc.y, sigma=p["sigma"], noise=noise)
        like |= rc.at_sites
        p["residual"]["dropped"] = int((~like).sum())
        keep = np.r_[np.ones(len(found), dtype=bool), like]
        rc = replace(rc, x=rc.x[like], y=rc.y[like], zscore=rc.zscore[like], at_sites=rc.at_sites[like],
                     fit={k: np.asarray(v)[keep] for k, v in fit.items() if np.size(v) == keep.size})
        p["residual"]["n_atoms"] = int(rc.x.size)
        if rc.x.size == 0:
            return found
    else:
        rc = _edge_like_a_class(img, found, rc, p, noise)
    ix = np.clip(np.rint(rc.x).astype(np.int64), 0, nx - 1)
    iy = np.clip(np.rint(rc.y).astype(np.int64), 0, ny - 1)
    x, y = np.r_[found.x, rc.x], np.r_[found.y, rc.y]
    amp = np.r_[found.amplitude, np.full(rc.x.size, np.nan)]
    fit_amp = np.asarray(rc.fit.get("amplitude", np.zeros(0)), dtype=np.float64)
    ok = np.asarray(rc.fit.get("fit_ok", np.zeros(0, bool)), dtype=bool)
    n_fit = min(fit_amp.size, x.size)
    use = np.zeros(x.size, dtype=bool)
    use[:n_fit] = ok[:n_fit] & np.isfinite(fit_amp[:n_fit])
    amp[:n_fit] = np.where(use[:n_fit], fit_amp[:n_fit], amp[:n_fit])
    amp = np.where(np.isfinite(amp), amp, np.nanmedian(amp[found.x.size:]) if np.isfinite(amp[found.x.size:]).any()
                   else np.nanmin(amp))
    # fitted amplitudes relative to the bright columns around; the references come from fitted
    # columns centred inside the image (a column beyond the edge, fitted from its tail, can come
    # out with any amplitude)
    inside = use & (x >= 0) & (x <= nx - 1) & (y >= 0) & (y <= ny - 1)
    loc_ref, glob_ref = local_reference(x, y, amp, p["spacing"],
                                        use=inside if inside.sum() >= MIN_LATTICE_ANCHORS else None)
    log_rel = np.log(np.maximum(amp / np.maximum(loc_ref, 1e-12 * abs(glob_ref) + 1e-300), 1e-6))
    if p["sublattice_mode"] == "none":  # no classes asked for: one
        sub = np.zeros(x.size, dtype=np.int64)
    elif p["sublattice_mode"] == "templates":
        # the user's templates name the classes: a new column joins the class whose (relative)
        # fitted peak it is nearest to, the others keep theirs
        n_old = found.x.size
        sub = np.r_[found.sublattice, np.zeros(rc.x.size, dtype=np.int64)]
        classes = np.unique(found.sublattice)
        med = np.array([np.median(log_rel[:n_old][use[:n_old] & (found.sublattice == k)])
                        if np.any(use[:n_old] & (found.sublattice == k)) else np.inf for k in classes])
        if rc.x.size and np.isfinite(med).any():
            sub[n_old:] = classes[np.argmin(np.abs(log_rel[n_old:, None] - med[None, :]), axis=1)]
        p["residual"]["classes"] = "the template class nearest by fitted peak"
    elif sublattices == "auto":
        sub = classify_columns(log_rel, fit_mask=use)
        p["sublattice_mode"] = f"{p['sublattice_mode']}, then classes of fitted amplitude after the residual passes"
    else:
        sub = np.r_[found.sublattice, np.full(rc.x.size, int(found.sublattice.max()) + 1 if found.sublattice.size else 0)]
    p["n_sublattices"] = int(sub.max()) + 1
    return FoundAtoms(x=x, y=y, score=np.r_[found.score, found.correlation[iy, ix].astype(np.float64)],
                      area=np.r_[found.area.astype(np.float64), np.full(rc.x.size, np.nan)], sublattice=sub,
                      zscore=np.r_[found.zscore, rc.zscore], amplitude=amp, correlation=found.correlation,
                      templates=found.templates, params=p)
