"""Synthetic atomic-column samples with ground truth, and scoring against it (pure NumPy/SciPy).

Each generator builds the geometry of a sample (column centres in pixels, labels, displacements,
integrated counts and widths), renders it with :mod:`~atomds.core.samples.render` (pixel-integrated
Gaussian columns on a smooth background, Poisson shot noise and Gaussian read noise) and returns a
:class:`Sample`. Positions are in pixels: ``x`` = column index, ``y`` = row index, pixel centres at
integer coordinates. The ground truth holds every column whose centre lies inside the image area
``-0.5 <= x < nx - 0.5``, ``-0.5 <= y < ny - 0.5``; columns just outside are rendered too (so the
image edges look like a crop of a larger crystal) but are not part of the truth.

Everything is seeded: the same arguments give the same sample, bit for bit.

Conventions shared by all generators
------------------------------------
dose
    Integrated counts of one full column (the expected total of its Gaussian over the plane).
sigma
    Gaussian standard deviation of a column, in pixels.
spacing
    Nearest-neighbour distance of the (main) lattice, in pixels.
background
    Base level of the smooth background, as a fraction of the peak height of a full column
    (``dose / (2 pi sigma**2)``), so that lowering the dose lowers background and signal together,
    as a lower beam current does. The base level in counts per pixel is ``Sample.background_level``;
    a gentle tilt and bump (:func:`~atomds.core.samples.render.smooth_background`, variation 0.3) raise it by
    up to 30 % (about 15 % on average); the exact field is ``Sample.background``.
read_noise
    Standard deviation of the Gaussian read noise, in counts per pixel.

Modules
-------
``base``          the :class:`Sample` record, argument checks, seeds
``render``        the image model: pixel-integrated Gaussian columns, smooth background, noise
``lattice``       lattice vectors and sites, thinning, atom tables
``compose``       atom table -> :class:`Sample` (vacuum hole, support film, background, noise)
``hexagonal``     a generator, one sample kind per module, as are ``nanoparticle``, ``two_phase``,
``perovskite``    (with ``polar``), ``frames`` and ``species`` (honeycomb, perovskite [110], TMD, dark)
``thickness``     particles whose thickness contrast is ten times their columns' (local contrast)
``boundary``      two crystals meeting along a band of real, disordered columns
``particle``      columns of 1..N atoms with a known cross-section law (atom counting, overlapping columns)
``stm``           STM topographs (heights in m): adatom lattices with tilt, scan-line offsets, steps
``sweep``         random images from a wide space (lattices, species, doses, artefacts) for the robustness sweep
``spectra``       EELS-like spectra per phase and spectrum images
``scoring``       matching found positions to the truth: recall, false positives, error
"""

from __future__ import annotations

from .base import Sample, replace
from .boundary import grain_boundary_sample
from .frames import FrameStack, frame_stack_sample
from .hexagonal import hexagonal_sample
from .lattice import lattice_sites, lattice_vectors, thin_points
from .nanoparticle import nanoparticle_sample
from .particle import THICKNESS_PROFILES, cross_section_law, particle_sample
from .perovskite import perovskite_sample, polar_sample
from .render import add_noise, render_columns, smooth_background
from .scan import scan_distorted, scan_line_shifts
from .scoring import default_max_distance, match_positions, score_positions
from .species import dark_sample, honeycomb_sample, perovskite110_sample, tmd_sample
from .spectra import energy_axis, phase_spectra, spectrum_cube, spectrum_grid
from .stm import STM_LATTICES, stm_sample
from .sweep import SWEEP_LATTICES, SweepSample, draw_sweep_params, render_sweep, score_sweep, sweep_sample, sweep_seeds
from .thickness import thick_particles_sample
from .two_phase import VACANCY_PATTERNS, two_phase_sample

__all__ = [
    "Sample",
    "hexagonal_sample",
    "two_phase_sample",
    "perovskite_sample",
    "polar_sample",
    "nanoparticle_sample",
    "particle_sample",
    "cross_section_law",
    "THICKNESS_PROFILES",
    "honeycomb_sample",
    "perovskite110_sample",
    "tmd_sample",
    "dark_sample",
    "thick_particles_sample",
    "grain_boundary_sample",
    "lattice_sites",
    "lattice_vectors",
    "thin_points",
    "match_positions",
    "default_max_distance",
    "score_positions",
    "phase_spectra",
    "spectrum_cube",
    "energy_axis",
    "spectrum_grid",
    "SAMPLE_NAMES",
    "FrameStack",
    "frame_stack_sample",
    "VACANCY_PATTERNS",
    "replace",
    "render_columns",
    "add_noise",
    "smooth_background",
    "stm_sample",
    "STM_LATTICES",
    "SWEEP_LATTICES",
    "SweepSample",
    "draw_sweep_params",
    "render_sweep",
    "score_sweep",
    "sweep_sample",
    "sweep_seeds",
    "scan_distorted",
    "scan_line_shifts",
]

#: The samples of :mod:`atomds.datasets` (``datasets.load(name)``), in the order listed.
SAMPLE_NAMES = (
    "hexagonal", "two_phase", "perovskite", "polar", "nanoparticle", "thick_particles", "grain_boundary", "particle",
    "honeycomb", "perovskite110", "tmd",
)
