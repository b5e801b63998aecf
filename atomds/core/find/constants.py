"""The tuned constants of atom finding, in one place.

Each was set on the bundled samples and the robustness cases of ``benchmarks/`` (lattices,
doses, holes, amorphous films, dense and sparse lattices); the comment says what it decides.
Lengths are in column spacings unless a unit is given; amplitudes are fractions of a class's
median unless said otherwise. The scales' own constants (crops, peaks averaged for the column
width) live in :mod:`atomds.core.scales`.
"""

from __future__ import annotations

# --- significance (noise z-scores) -------------------------------------------------------------
#: Expected false blobs of pure noise over the interior of an image: sets the automatic ``z_min``.
FALSE_BLOBS = 0.5
#: The same budget for the strip within half a template of the border (partial windows).
FALSE_BLOBS_BORDER = 0.25
#: Rounds of the significance threshold's update by the area the accepted columns take.
Z_ROUNDS = 4
#: Area a column takes from the search for noise blobs, spacing^2 (a close-packed cell).
COLUMN_CELL = 0.866
#: The area left for noise never falls below this fraction of the area searched.
MIN_FREE_AREA = 0.02
#: Smallest significance (noise sd) of a blob kept because it sits on a lattice site.
Z_FLOOR = 2.0
#: Significant columns needed before sub-threshold blobs are judged by the lattice they sit on.
MIN_LATTICE_ANCHORS = 20
#: A blob below ``min_contrast`` of the bright columns around it (the thin edge of a wedge) is kept
#: when it sits on the lattice of the others and its amplitude is at least this share of the median
#: of its ``NEIGHBOUR_COUNT`` nearest clear columns (exercised on generated images only: a wedge whose
#: edge row holds 300 counts beside 410-520 in the next rows, and the sweep's holes).
NEIGHBOUR_SHARE = 0.5
#: ... the nearest clear columns that give that median (the inner rows beside a wedge's edge row).
NEIGHBOUR_COUNT = 4
#: Anchors at lattice vectors that a sub-threshold blob needs to be kept.
SITE_MATCHES = 3

# --- correlation threshold ---------------------------------------------------------------------
#: Automatic threshold: this fraction of the low quantile of the significant maxima's correlation.
THRESHOLD_FRACTION = 0.5
#: ... the quantile (the dimmest and noisiest columns still form blobs of a few pixels).
THRESHOLD_QUANTILE = 0.02
#: Range of the automatic threshold, and its value when no maximum is significant.
THRESHOLD_RANGE = (0.2, 0.8)
#: Lower bound of the automatic threshold where a local background was removed (``flatten_local``
#: applied: thickness profiles, particles on a film). There the columns' correlation with the
#: template is diluted by what the opening leaves (support blobs of a column's size, the rest of a
#: slope): the thin columns at particle rims correlate at 0.1-0.2, and the floor of
#: ``THRESHOLD_RANGE`` left them without a blob (82 of 1743 columns of a 2048^2 image, up to 19 % of
#: a particle). Their significance is judged by the z-score and the lattice, as everywhere. On
#: other images a blob correlating below 0.2 is not column-shaped (on STM topographs without a
#: floor such blobs at vacancies and steps raised the extra finds from 2.0 % to 3.8 %).
THRESHOLD_FLOOR_FLATTENED = 0.0
THRESHOLD_DEFAULT = 0.5

# --- blob shape --------------------------------------------------------------------------------
#: Maxima of one blob closer than this (spacings) are one column.
MERGE_RADIUS = 0.5
#: Separate blobs closer than this many column widths are one column (two Gaussians closer than
#: twice their width show a single maximum: the Sparrow limit); the larger stands.
UNRESOLVED_WIDTHS = 2.0
#: Automatic area bounds: robust spread of the log areas times this, at least log(4) ...
AREA_SPREAD_SD = 4.0
AREA_MIN_SPREAD = 4.0
#: ... and the lower bound another factor 2 below.
AREA_LOWER_FACTOR = 2.0

# --- contrast and breadth ----------------------------------------------------------------------
#: Quantile of the amplitudes that stands for "the bright columns" (locally and image-wide).
BRIGHT_QUANTILE = 0.9
#: The local reference of the bright columns is at least this fraction of the image-wide one.
GLOBAL_REFERENCE_FLOOR = 0.5
#: A single amplitude counts at most this many times the image-wide reference (lone outliers).
OUTLIER_CAP = 3.0
#: Side of the cells over which the local bright-column amplitude is taken (3 x 3 of them).
REFERENCE_CELL = 2.0
#: A blob is tested for breadth only when its amplitude is below this fraction of its class's median.
BREADTH_WEAK = 0.75
#: Too broad: shape ratio below the class median minus this many robust sd ...
BREADTH_SD = 5.0
#: ... or at least this much below it.
BREADTH_MIN_DROP = 0.08
#: Fewest clear blobs in a class to set its median (breadth, faintness).
MIN_CLASS_COUNT = 5

# --- lattice tests -----------------------------------------------------------------------------
#: A blob is weak when its amplitude is below this fraction of its class's median (image-wide).
WEAK = 0.75
#: Below this fraction of its class's median amplitude a blob near clear columns must still be
#: in an ordered neighbourhood.
VERY_WEAK = 0.4
#: Weak blobs farther than this (in spacings) from every column that is not weak form a region of
#: their own, which must be a lattice (a thin area) and not a disordered film.
REGION_REACH = 3.0
#: Fraction of unmatched neighbour vectors above which a neighbourhood is disordered
#: (:func:`atomds.core.neighbors.phase_features`: 0 in a crystal, 0.5-1 among random positions).
DISORDERED = 0.4
#: Rounds of the disorder test, each without the blobs already dropped.
DISORDER_ROUNDS = 3
#: A blob is faint when its amplitude relative to the bright columns around it is below this
#: fraction of its class's median (then it must be supported by the lattice).
FAINT = 0.5
#: Above this fraction of the interior blobs, faint blobs are a population and are not tested.
FAINT_MAX_FRACTION = 0.1
#: A well-formed column at least this fraction of the median single-column height of its species
#: nearby is real wherever it sits (grain boundary, dislocation core, interface): the lattice
#: tests only judge fainter blobs (issue 10: real columns at 60-100 % stay).
KEEP_AMPLITUDE = 0.6
#: ... within this many standard errors of its measured height (noise and the pixel grid: a
#: column at 0.6 must not be lost to its own noise).
KEEP_ERRORS = 2.0
#: ... "nearby": the median over this many nearest accepted blobs of the class (a few shells).
KEEP_NEIGHBOURS = 24
#: ... "well-formed": its single-Gaussian shape match at most this many robust sd below the
#: class's median.
KEEP_SHAPE_SD = 5.0
#: A residual maximum off the lattice is judged as a real column (``residual.real_residual_columns``)
#: only when columns surround it: within this many spacings ...
SURROUND_SPACINGS = 2.0
#: ... in every one of this many equal angular sectors around it (an interstitial or a boundary
#: column; not a speck of the support beside a particle's edge, where 276 specks as bright as the
#: thin rim columns passed without it on a 1024^2 Au particle on carbon).
SURROUND_SECTORS = 6
#: Radius of the disc of the single-column fit, column sigmas (the peak, little of the neighbours).
COLUMN_DISC = 2.0

# --- classes and the second pass ---------------------------------------------------------------
#: Fewest blobs inside the interior to fit the classes on them alone (else every kept blob).
MIN_INTERIOR_FIT = 20
#: Clearest columns per class averaged into its template in the second pass.
CLASS_TEMPLATE_PEAKS = 2000
#: Fewest interior columns of a class to build its template from.
CLASS_TEMPLATE_MIN = 5
#: Classes of fitted columns (:func:`~atomds.core.find.classes.fitted_classes`): a column whose centre lies
#: closer than this many fitted widths to the image edge has part of its profile cut off, so its fitted
#: peak and volume are biased; it does not shape the classes (it is still classed by them)
CLASS_BORDER_WIDTHS = 3.0
#: A failed fit or a centre beyond the image's edge takes the class ``find_atoms`` gave it (mapped onto the
#: fitted classes) when ``find_atoms``'s classes agree with the fitted ones on at least this share of the
#: columns away from the border
CLASS_AGREEMENT = 0.9
#: Fewest columns (fitted, away from the border) to class columns by their fits at all
MIN_FITTED = 20
#: ... and a fitted column whose class has a posterior probability below this (between the classes)
#: takes the earlier class too, where the classes agree as wholes
CLASS_CONFIDENT = 0.99
#: ... or one farther than this squared Mahalanobis distance from its own class's centre (the 99.9th
#: percentile of a chi-square with two degrees of freedom: an outlier of its class)
CLASS_OUTLIER = 13.8
#: Where the fitted classes are the earlier ones (as many) on at least this share of the columns, the
#: earlier classes stand as they are: the few columns they differ on are those intensity alone cannot
#: settle, and a template also sees the column's surroundings
CLASS_KEEP = 0.98
#: Where the fitted and the earlier classes (as many) disagree on a column, the columns on its own
#: sublattice decide (those at ``p + T`` for the lattice's translations ``T``, on which the two
#: agree): at least ``SITE_MATCHES`` of them, and this share of them in one class. Two classifiers of
#: intensity disagree where something on top (amorphous contamination) or the sampling biases one.
SITE_VOTE_SHARE = 2.0 / 3.0
#: ... only where the classes are sublattices: the agreed columns of every class have their own class
#: at ``p + T`` for at least this share of their agreed partners (a random alloy on one site, 30 %
#: of a minority: 0.7 at most; a dopant class: about 0)
SITE_CONSISTENT = 0.95
#: ... judged on at most this many agreed columns (evenly drawn)
SITE_CHECK_MAX = 5000
#: A class of columns other than the brightest is a sublattice when at least this share of its members
#: sit at an offset from their nearest bright column that SITE_MATCHES others share (else its blobs are
#: judged with the bright class: amorphous specks form a class of intensity, not of sites). Sublattices of
#: simple lattices share 0.95 and more, the adatoms of a Si(111) 7x7 STM image (a dozen offsets per
#: cell) about 0.5, a class of amorphous rim blobs none.
CLASS_ON_SITES = 0.25
#: Classes pooled over a sublattice (:func:`~atomds.core.find.classes.pooled_classes`): two species a
#: few percent apart in intensity overlap column by column (sweep images of master seed 2026: 14 of 83
#: multi-species images gave one class or merged two, ARI 0-0.58), but a translation of their ordered
#: lattice maps each column onto its own species. Translations up to this many spacings are tried
#: (the lattice's own and sums of two, which reach the cells of species ordered along rows: three
#: species in turn need translations of three spacings; a choice, not a measurement) ...
POOL_REACH = 3.6
#: ... a partner lies within this many spacings of ``p + t`` (a choice: room for scan jitter and
#: strain; SITE_TOL, 0.15, is for a lattice's own translations over shorter reach) ...
POOL_TOL = 0.25
#: ... and a translation keeps the species where its pairs' features differ by at most this share of
#: what random pairs of columns differ by (the median squared difference of the robustly
#: standardised features: about 1 for noise alone, less where part of the spread is the species'),
#: by at least ``POOL_Z`` of its sampling error (``sqrt(POOL_MEDIAN_VAR / pairs)``: the relative
#: variance of the median of a chi-square with two degrees of freedom, 1 / (n ln(2)^2) for an
#: exponential, about twice the mean's), over at least ``MIN_LATTICE_ANCHORS`` pairs. POOL_MAX_SHARE
#: was 0.7 first and raised to 0.9 for the unit test's checkerboard of 1 : 0.93 at 5 % noise (shares
#: about 0.75): set on generated images; the significance test (POOL_Z) is what refuses noise
POOL_MAX_SHARE = 0.9
POOL_Z = 4.0
POOL_MEDIAN_VAR = 2.08
#: These are judged on the usable columns nearest the middle of the columns, at most this many (a
#: compact patch: pairs need both ends); the pooled features of every column only where a split stands
#: (a choice for speed: about 80 ms on 86,800 columns where nothing is pooled)
POOL_SAMPLE = 3000
#: A pooled class is new only within one class of the columns' own (at least this share of it there),
#: and its columns lie among those of the others it was split from: at least ``POOL_MIXED`` of each
#: have one of the other within ``POOL_MIX_REACH`` spacings (species ordered on sites are intermixed
#: at that range, 0.91-1.0 on the sweep's images; a part of the image that reads a few percent
#: brighter is not: 0.28-0.69 on sweep image 1844663748, one species on two kinds of site split by
#: region). Both from the sweep's generated images.
POOL_NESTED = 0.9
POOL_MIXED = 0.8
POOL_MIX_REACH = 2.0
#: ... and each pooled class is a sublattice: at least this share of its columns' partners (at the
#: translations that keep the classes) are of its class (a class of odd columns scattered over the
#: sites, e.g. a review's dumbbells found merged among resolved ones, is not). Set at 0.8 like
#: POOL_MIXED, not measured over many images
POOL_CONSISTENT = 0.8
#: A column whose own features place it in another pooled class with at least this posterior keeps
#: that class (a dopant on a site of a dimmer species): about a 5-sigma excursion between classes
#: 1.6 sigma apart
POOL_OWN = 0.999

# --- local contrast ----------------------------------------------------------------------------
#: The background under the columns is removed before finding when its standard deviation over
#: the image exceeds this multiple of the columns' contrast (see :mod:`.contrast`): below it the
#: correlation's own window means cope, and the image is found as it is. (Particles at a ratio
#: of 0.9 already hide the lattice from the autocorrelation; a flat crystal with a hole or an
#: amorphous film is at 0.03-0.25.)
LOCAL_BACKGROUND_RATIO = 0.5

# --- residual passes (dim columns beside bright ones) --------------------------------------------
#: Most rounds of fit, subtraction and search of the residual.
RESIDUAL_ROUNDS = 3
#: A residual maximum closer than this many column widths to a column found is that fit's leftover.
RESIDUAL_EXCLUSION = 2.0
#: Reach of each column's Gaussian in the model subtracted, column widths.
RESIDUAL_REACH = 4.0
#: Columns are modelled as elliptical Gaussians in the residual passes where the coherent part of
#: their ellipticity, ``|mean((major / minor - 1) exp(2 i theta))|`` over a sample of elliptical fits,
#: is at least this many of its standard errors (from the fits' scatter). An isotropic model of
#: elliptical columns leaves two lobes along each column's long axis, which the passes took for
#: columns: 2.4 x 1.6 px columns 12 px apart gave 474 such finds for 634 columns. A significance,
#: not a size: whether lobes show depends on the dose, and 2.2 x 2.0 px columns at 8000 counts
#: (ellipticity 0.10) gave 470 false finds under a size threshold of 0.1. Noise elongates single
#: fits in random directions, which cancel.
ELLIPTICITY_Z = 5.0
#: Columns fitted to measure it (every k-th of those found).
ELLIPTICITY_SAMPLE = 256
#: ... and only where the residual's candidates look like lobes (:func:`~.residual._lobes`): inside a
#: column's own cell, closer than this many spacings to it, where no column can be ...
LOBE_SPACINGS = 0.6
#: ... in mirror pairs about it (this share of those candidates with one at its mirror point) ...
LOBE_PAIRED = 0.5
#: ... and at least this many of them. Columns with a dim neighbour on one side (a dumbbell's partner,
#: species ordered in rows) are elongated coherently too, but their candidates sit at one offset: the
#: elliptical model there took in 56 of 306 dim dumbbell partners (tests/core/test_elliptical_columns.py
#: at 76d2407) and 0.6 % of a dense two-species lattice's dim columns (sweep image 1207974997).
LOBE_MIN = 8
#: A probe's long tails (:func:`~.residual.profile_tails`). Fitted one Gaussian each, Moffat columns
#: (beta 2.5) leave 2-5 % of a column between neighbours, at the same offsets from every column, which
#: passed for a sublattice: 1230 false finds on a square lattice of 10 px at 40,000 counts, 435 on a
#: perovskite at 100,000 (benchmarks/RESULTS.md, "Columns with a probe's long tails"). The image's
#: column profile is fitted as a mixture of centred Gaussians of these widths (column widths) with
#: positive weights, times each column's fitted intensity. Broader widths fitted the step of the
#: background at a hole's rim or a support's edge (weights of 7-12 on 4 widths, and 63-134 false finds
#: on three images of the randomized sweep).
TAIL_WIDTHS = (0.7, 1.0, 1.4, 2.0)
#: ... the Gaussian nearest that profile out to this many widths is what a column's own fit takes; the
#: rest is the tails
TAIL_CORE_WIDTHS = 2.5
#: ... fitted over a window of at most this many px a side, centred on the columns (the profile is the
#: image's: a window of hundreds of columns sets its four weights; 512 px took 0.3-0.4 s an image) ...
TAIL_WINDOW = 256
#: ... leaving out, within this many widths, the residual's maxima whose peak is at least this share of
#: the columns' (columns not found yet: with none left out, a honeycomb's B at 0.5 of A drew the profile
#: back to one Gaussian, and 437 false finds stayed). Fainter maxima stay in, the tails' own piles among them: a mixture
#: that falls from its centre cannot draw a faint sublattice (O at 0.08 and 0.15 of the A columns kept
#: their recall), and with the piles left out too the profile was read from the columns' cores alone,
#: which do not hold the tails (a perovskite at 100,000 counts kept 211 false finds).
TAIL_MASK_WIDTHS = 2.5
TAIL_MASK_SHARE = 0.1
#: ... over the pixels within this many spacings of a column (beyond the lattice the background steps)
TAIL_WITHIN = 1.0
#: The tails are taken off the image the passes search only where they could make or hide a maximum:
#: where the matched filter of their map reaches this many noise sd (either sign) somewhere (below
#: RESIDUAL_SITE_Z, the lowest level a residual maximum is taken at), and where that does not give the
#: first pass more candidates than the square root of their count. Gaussian columns mostly stay below it; where they do not (two widths,
#: high doses), the profile's tails are small and what they change is within the model's misfit.
TAIL_Z = 2.0
#: Width of the blur (matched-filter half-widths) whose smooth background is removed from the
#: residual before its matched filter: much wider than a column, so the columns stay.
RESIDUAL_BACKGROUND_WIDTHS = 4.0
#: A residual maximum within RESIDUAL_EXCLUSION widths of the border may be the tail of a column
#: centred outside the image: it is kept only when its own fit (neighbours subtracted) puts the
#: centre inside the image (``-0.5 <= x <= nx - 0.5``), within this many widths of the
#: maximum, with an integrated intensity above ``RESIDUAL_BORDER_SIGNIFICANCE`` standard errors.
RESIDUAL_BORDER_SHIFT = 1.0
#: A residual maximum on a site that the columns around it predict (``SITE_MATCHES`` of them at
#: the lattice's translations from it) is a column from this significance (noise sd) up: few places are tested
#: there (the empty sites, as many as the missing columns and a hole's rim sites), and pure noise
#: exceeds 3 sd at 0.13 % of them (below 0.2 false column per 100 empty sites).
RESIDUAL_SITE_Z = 3.0
#: A residual maximum is on a site when the columns around predict one within this many spacings of it ...
SITE_TOL = 0.15
#: ... or, for a weak maximum (below the image-wide threshold), within this many of its position
#: standard deviations (sqrt(2) sigma / z on each axis for a column of matched-filter SNR z; 3: 1 % of
#: real columns fall farther) ...
SITE_POSITION_SD = 3.0
#: ... but never farther than this many spacings (well short of the next site, half a spacing away at least)
SITE_TOL_MAX = 0.3
#: A residual maximum closer to a found column than this fraction of the nearest-column distance
#: (and than ``JOINT_TEST_WIDTHS`` column widths) must survive a joint fit with it: a lattice's
#: own columns are a whole distance apart; shoulders of distorted columns sit at a fraction of it
#: (scan jitter: about a quarter). Below 0.5: while a dim sublattice is unseen, the distance read
#: is that of the bright one, and a displaced honeycomb B sits at half of it.
JOINT_TEST_SPACINGS = 0.4
#: ... and closer than this many column widths (beyond, one Gaussian does not take the other's signal).
JOINT_TEST_WIDTHS = 5.0
#: The joint fit of such a maximum takes the columns within this many nearest-column distances.
JOINT_TEST_REACH = 3.0
#: Translations of a lattice (:func:`~atomds.core.find.residual.lattice_translations`): offsets
#: to neighbours within this many nearest-column distances (a perovskite [110]'s period is 2.8)...
TRANSLATION_REACH = 3.2
#: ... made by at least this share of the columns that make the most common offset (an offset
#: between two sublattices is made by one of them: half, or less).
TRANSLATION_SHARE = 0.75
RESIDUAL_BORDER_SIGNIFICANCE = 3.0
#: Columns centred just outside the image (:func:`~atomds.core.find.residual.outside_columns`) are
#: predicted by the translations that map each column onto one of its own kind: those whose pairs
#: of columns differ in peak by at most this many times the least such difference (a median, in
#: shares of the median peak; plus a hundredth). Twice: noise alone spreads the medians of the
#: translations that keep the species by much less, and a translation between species differs by
#: their contrast.
OUTSIDE_PEAK_SPREAD = 2.0
#: The translations' steps and scatters are read from at most this many columns near the border,
#: and their sums' shares from a fifth of them (a 4096^2 image has about 5000 there: with all of
#: them, and every sum tested on 1000, this took 0.07-0.1 s of refine's 0.9 s; 0.02 s now).
OUTSIDE_SAMPLE = 1000
#: ... and each is kept only where the border's pixels hold at least this share of its predicted
#: peak (fitted there with a constant): where the crystal ends before the border, the lattice
#: predicts columns over vacuum, which read near 0.
OUTSIDE_SEEN = 0.5
#: ... above the local level, the median of the pixels around where the column's Gaussian is below
#: this share of its peak (beyond 2.4 widths) ...
OUTSIDE_SEEN_LEVEL = 0.05
#: ... and only where at least this share of the Gaussian's square sum falls on the image (its
#: centre within 2.2 widths of it): the tail of a column farther out puts under a tenth of its peak
#: on the border's pixels, and its fit is noise. (At 0.05, the columns 1.5-2.5 widths outside
#: were not tested: over vacuum, their model put 40-54 counts on the border's pixels, columns of
#: 190 at their peak.)
OUTSIDE_SEEN_PART = 0.001
#: Most offsets from the columns found tried as the sites of a dim sublattice
#: (:func:`~atomds.core.find.residual.sublattice_sites`; a honeycomb's B has three, the dim rows of an
#: ordered hexagonal lattice four, counting ties between two equidistant columns).
SUBLATTICE_MODES = 8
#: ... each taken further only where the residual's matched filter reads at least this much at its
#: sites (median, noise sd) ...
SUBLATTICE_MEAN_Z = 1.0
#: ... and at least this many standard errors of it (1 / sqrt(sites) for pure noise) ...
SUBLATTICE_MEAN_Z_SD = 5.0
#: ... and is positive at this share of them (a column of noiseless z 0.7 reads positive at 0.76).
SUBLATTICE_POSITIVE = 0.75
#: ... and its sites hold at least this share of the median integrated intensity of the columns found
#: (the dim species of the sweep, 15-100 % of the brightest peak; the leftovers of fits a few percent
#: narrow on a dense lattice at 13,000 counts, sweep image 1974161246: 5.8 %).
SUBLATTICE_MIN_SHARE = 0.1
#: ... each tried first on a patch of this many sites (of every offset), before all its sites are fitted.
SUBLATTICE_PATCH = 96
#: Where an offset's sites fail those readings over the whole image, each site's this many nearest sites
#: of its offset are read instead (a sublattice over part of the image: a thin crystal's dim rows, one
#: domain's ordering); pure noise reads a median of 1 sd over 25 sites at 4 standard errors.
SUBLATTICE_LOCAL = 25
#: Offsets that stood are fitted again, in later passes, at the sites they left that have at least this
#: many columns found by the passes ...
REFIT_NEIGHBOURS = 2
#: ... within this many spacings (the sites beside a sublattice's columns, not the empty part of the image).
REFIT_REACH = 2.0
