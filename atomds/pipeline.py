"""The per-image job: named stages over one parameters object, shared by ``analyze``, ``batch``, the CLI and the report.

:class:`AnalysisParams` holds every option of the job (frozen, validated, ``to_dict``/``from_dict``
for JSON). :data:`STAGE_FUNCTIONS` maps each stage name to a small function ``stage(ds, params)
-> ds``; :func:`run_stages` runs any of them in the canonical order of :data:`STAGES`, and
:func:`analyze` runs them all (align frames -> find -> refine -> strain/polarisation maps ->
neighbourhoods -> PCA -> phases,
K from the dendrogram unless given) and records the parameters as ``analyze_params``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import xarray as xr

from .core.image import CONTRAST_CHOICES
from .core.refine import MODELS
from .errors import InvalidParameterError, TooFewAtomsError
from .params import note_fallback, record_params, step_params

__all__ = [
    "AnalysisParams",
    "STAGES",
    "STAGE_FUNCTIONS",
    "SORTS",
    "PHASE_MODES",
    "analyze",
    "run_stages",
    "check_stages",
    "resolve_params",
    "add_params_arguments",
    "params_from_args",
]

#: Neighbour orders of the descriptor that PCA decomposes.
SORTS = ("angle", "distance")
#: What the ``phases`` stage makes: per-image clusters and regions, or only the rotation-invariant
#: descriptor that a library clusters over all its images (:func:`atomds.library.kmeans`).
PHASE_MODES = ("cluster", "descriptor")

# dims of the phase-descriptor table that cannot sit beside the PCA descriptor in one Dataset
_PHASE_ONLY_DIMS = {"neighbor", "feature"}


def _option(flags: tuple[str, ...], help: str, **kwargs: Any) -> dict[str, Any]:
    """Field metadata: the command-line flags and help of an option (None flags: not on the command line)."""
    return {"flags": flags, "help": help, **kwargs}


@dataclass(frozen=True)
class AnalysisParams:
    """Every option of the per-image job, in one frozen, validated object.

    Parameters
    ----------
    k : int
        Neighbours per atom (>= 1).
    sort : {"angle", "distance"}
        Neighbour order of the descriptor that PCA decomposes (phases use the rotation-invariant
        ``"phase"`` descriptor whatever the order).
    n_clusters : int, optional
        Number of k-means clusters (>= 1); chosen from the dendrogram when None.
    n_components : int, optional
        PCA components kept (>= 1); all when None.
    model : {"gaussian", "elliptical"}
        Column model of the refinement.
    contrast : {"auto", "bright", "dark"}
        Columns brighter (HAADF, STM) or darker (ABF, BF) than their surroundings; "auto"
        (default) decides from the image; refinement follows finding's choice.
    find_options : mapping, optional
        Further keyword arguments of ``find_atoms`` (template, threshold, ...; JSON values).
    phases : {"cluster", "descriptor"}
        ``"cluster"``: k-means and regions on each image; ``"descriptor"``: store only the phase
        descriptor ``phase_descriptor(atom, phase_feature)`` for library-wide learning.

    Raises
    ------
    InvalidParameterError
        For a value out of range, naming the option.
    """

    k: int = field(default=6, metadata=_option(("-k", "--neighbors"), "neighbours per atom (default 6)", type=int))
    sort: str = field(default="angle", metadata=_option(("--sort",), "neighbour order", choices=SORTS))
    n_clusters: int | None = field(
        default=None, metadata=_option(("--clusters",), "number of clusters (default: from the dendrogram)", type=int)
    )
    n_components: int | None = field(
        default=None, metadata=_option(("--components",), "PCA components to keep (default: all)", type=int)
    )
    model: str = field(default="gaussian", metadata=_option(("--model",), "column model", choices=MODELS))
    contrast: str = field(
        default="auto",
        metadata=_option(("--contrast",), "columns brighter (HAADF, STM) or darker (ABF, BF) than their surroundings "
                         "(default auto: decided from the image)", choices=CONTRAST_CHOICES),
    )
    find_options: Mapping[str, Any] = field(default_factory=dict, metadata=_option((), "extra find_atoms arguments"))
    phases: str = field(default="cluster", metadata=_option((), "what the phases stage makes", choices=PHASE_MODES))

    def __post_init__(self) -> None:
        # frozen: fields are set through object.__setattr__, once, here
        options = dict(self.find_options or {})
        if "contrast" in options:
            raise InvalidParameterError("give the contrast as contrast=, not inside find_options.")
        object.__setattr__(self, "find_options", MappingProxyType(options))
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InvalidParameterError(f"k (neighbours per atom) must be an integer >= 1, got {self.k!r}.")
        for name in ("n_clusters", "n_components"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidParameterError(f"{name} must be an integer >= 1 or None, got {value!r}.")
        for name, allowed in (("sort", SORTS), ("model", MODELS), ("contrast", CONTRAST_CHOICES), ("phases", PHASE_MODES)):
            if getattr(self, name) not in allowed:
                raise InvalidParameterError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        try:
            json.dumps(dict(self.find_options))
        except (TypeError, ValueError) as exc:
            raise InvalidParameterError(f"find_options must hold JSON values (numbers, strings, lists): {exc}") from None

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        """The parameters as plain JSON values (``find_options`` as a dict)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["find_options"] = dict(self.find_options)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AnalysisParams:
        """Parameters from :meth:`to_dict`'s output (missing keys take their defaults; unknown keys raise)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InvalidParameterError(f"unknown analysis parameters {unknown}; known: {sorted(names)}.")
        return cls(**dict(values))

    @classmethod
    def from_options(cls, *, find_kwargs: Mapping[str, Any] | None = None, **options: Any) -> AnalysisParams:
        """Parameters from :func:`analyze`'s keywords: ``find_kwargs`` may carry ``contrast`` (as the CLI once did)."""
        find = dict(find_kwargs or {})
        if "contrast" in find:
            contrast = find.pop("contrast")
            # the default ("auto") is no choice: find_kwargs' contrast is taken
            if options.get("contrast", "auto") not in ("auto", contrast):
                raise InvalidParameterError(
                    f"contrast given twice: {options['contrast']!r} and find_kwargs['contrast'] = {contrast!r}."
                )
            options["contrast"] = contrast
        return cls.from_dict({**options, "find_options": find})

    def replace(self, **changes: Any) -> AnalysisParams:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------
# the stages: each ds -> ds, reading only the parameters object
# --------------------------------------------------------------------------------------------


def align(ds: xr.Dataset, params: AnalysisParams) -> xr.Dataset:
    """Align and sum a ``frames(frame, y, x)`` stack into ``image(y, x)``; an image passes unchanged."""
    if "image" not in ds.data_vars and "frames" in ds.data_vars:
        from .ops.preprocess import align_frames

        return align_frames(ds)
    return ds


def find(ds: xr.Dataset, params: AnalysisParams) -> xr.Dataset:
    """Find the atomic columns (``find_atoms`` with the contrast and the find options)."""
    return ds.lcx.find_atoms(contrast=params.contrast, **params.find_options)


def refine(ds: xr.Dataset, params: AnalysisParams) -> xr.Dataset:
    """Refine the atom positions with the column model."""
    return ds.lcx.refine(model=params.model)


def maps(ds: xr.Dataset, params: AnalysisParams) -> xr.Dataset:
    """Physical maps with errors: local strain against the image's median lattice, the slow-scan
    distortion (``scan_shift_x``, which the phases stage removes), and, on images
    of two or more sublattices, the polarisation of the displaced one (skipped, with the reason
    recorded in ``polarization_params``, when no sublattice pair forms cages)."""
    if ds.sizes.get("atom", 0) < 3:
        return record_params(ds, "strain", {"skipped": "fewer than 3 atoms"})
    ds = ds.lcx.strain().lcx.scan_distortion()
    n_sub = int(len(set(ds["sublattice"].values.tolist()) - {-1})) if "sublattice" in ds.variables else 0
    if n_sub < 2:
        return record_params(ds, "polarization", {"skipped": f"{n_sub} sublattice(s): no cage to measure from"})
    try:
        return ds.lcx.polarization()
    except InvalidParameterError as exc:
        return record_params(ds, "polarization", {"skipped": str(exc)})


def neighborhoods(ds: xr.Dataset, params: AnalysisParams) -> xr.Dataset:
    """Neighbour vectors in ``sort`` order (angle: from the image's most common bond direction)."""
    return ds.lcx.neighborhoods(k=params.k, sort=params.sort, ref_angle="auto" if params.sort == "angle" else 0.0)


def pca(ds: xr.Dataset, params: AnalysisParams) -> xr.Dataset:
    """PCA modes and loadings of the neighbour vectors (skipped, with the reason recorded in
    ``pca_params``, on an image of too few centre atoms)."""
    try:
        return ds.lcx.pca(n_components=params.n_components)
    except TooFewAtomsError as exc:
        return record_params(ds, "pca", _skipped("pca_skipped", "pca skipped", exc, params))


def phases(ds: xr.Dataset, params: AnalysisParams) -> xr.Dataset:
    """Phases from the rotation-invariant ``"phase"`` descriptor of each atom's neighbourhood.

    ``params.phases == "cluster"``: K from the dendrogram (unless ``n_clusters``) -> k-means ->
    regions, carried into ``ds`` (``cluster``, ``region``, the merge tree) beside its own
    neighbour table. ``"descriptor"``: only ``phase_descriptor(atom, phase_feature)``, which a
    library clusters over all its images. The phase table is built from the atoms alone
    (``neighborhoods`` drops every earlier neighbour-derived result), so this stage gives the same
    result wherever it runs after ``refine``.

    Where the maps stage measured a slow-scan distortion (``scan_shift_x``,
    :func:`atomds.ops.physics.scan_distortion`), the table is built from the positions with it
    removed: scanned with a wobble, one crystal's rows are sheared by a few per cent in turn and
    its neighbourhoods fall into stripes along the scan lines (5 of 60 generated single-phase
    images with drawn scan distortions gave two regions). Where the columns of one sublattice are
    polar (and refined: the decision needs their position errors), the table is built with those columns at their cage centres
    (:func:`atomds.core.polarization.parent_positions`): polar domains are one phase even where
    no rotation or mirror of the image relates them. What was done is recorded in the
    ``phase_parent_params`` attribute. On an image of too few centre atoms for the merge tree the
    clustering is skipped, with the reason in ``kmeans_params``.
    """
    source = _unscanned(_parent_structure(ds))
    table = source.lcx.neighborhoods(k=params.k, descriptor="phase")
    parent = {"phase_parent_params": source.attrs["phase_parent_params"]}
    if params.phases == "descriptor":
        D = table["descriptor"].rename({"feature": "phase_feature"})
        out = ds.drop_vars(["phase_descriptor", "phase_feature"], errors="ignore")
        out = out.assign_coords(phase_feature=D["phase_feature"].values).assign(
            phase_descriptor=D.drop_vars("phase_feature").assign_attrs(
                long_name="phase descriptor (rotation-invariant neighbourhood features)"
            )
        )
        out.attrs["phase_neighborhoods_params"] = table.attrs.get("neighborhoods_params", "{}")
        out.attrs.update(parent)
        return out
    try:
        table = table.lcx.linkage()
        K = params.n_clusters if params.n_clusters is not None else table.lcx.suggest_k()
    except TooFewAtomsError as exc:  # a crop of a few columns: no phases to tell apart
        out = record_params(ds, "kmeans", _skipped("phases_skipped", "phases not told apart", exc, params))
        out.attrs.update(parent)
        out.attrs["phase_neighborhoods_params"] = table.attrs.get("neighborhoods_params", "{}")
        return out
    out = _merge_phases(ds, table.lcx.kmeans(K).lcx.regions())
    out.attrs.update(parent)
    return out


def _skipped(kind: str, what: str, reason: Exception, params: AnalysisParams) -> dict[str, Any]:
    """A stage's params saying it was skipped, why, and what to change in this job (``hint``: the
    job's own option, for ``atomds analyze`` and :func:`analyze` alike; the reason names the
    accessor methods'); warned once per process (:func:`note_fallback`)."""
    hint = (f"fewer neighbours per atom than {params.k} (atomds analyze -k N, atomds.analyze(..., k=N)) "
            "or a larger image")
    out: dict[str, Any] = {"skipped": str(reason), "hint": hint}
    note_fallback(out, kind, f"{what}: {reason} (in this job: {hint})")
    return out


def _parent_structure(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with a polar sublattice at its cage centres (see :func:`phases`); nothing moves without
    ``x_err``/``y_err``."""
    from .core.polarization import parent_positions
    from .ops.physics import usable_atoms

    if not {"atom_x", "atom_y", "sublattice"} <= set(ds.variables):
        return record_params(ds, "phase_parent", {"moved": 0, "domains": 0, "skipped": "no sublattice labels"})
    errs = [np.asarray(ds[v].values, float) if v in ds.variables else None for v in ("x_err", "y_err")]
    x, y, info = parent_positions(
        ds["atom_x"].values, ds["atom_y"].values, errs[0], errs[1], ds["sublattice"].values, usable=usable_atoms(ds),
        polarized=_polarization_of(ds),
    )
    out = record_params(ds, "phase_parent", info)
    if info["moved"]:
        out = out.assign(atom_x=ds["atom_x"].copy(data=x), atom_y=ds["atom_y"].copy(data=y))
    return out


def _unscanned(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with the scan distortion the maps stage measured subtracted from its positions (zero
    where none was significant, so the positions are then exactly as they were)."""
    if "scan_shift_x" not in ds.variables:
        return ds
    return ds.assign(atom_x=ds["atom_x"] - ds["scan_shift_x"])


def _polarization_of(ds: xr.Dataset) -> dict[str, Any] | None:
    """The polarisation the maps stage put in ``ds`` (None where it did not), as
    :func:`atomds.core.polarization.polarization` returns it: not computed twice."""
    names = ("polarization_x", "polarization_y", "polarization_x_err", "polarization_y_err")
    rec = step_params(ds, "polarization") or {}
    if not set(names) <= set(ds.variables) or "displaced" not in rec or "n_cage" not in rec:
        return None
    return {**{n: np.asarray(ds[n].values, float) for n in names}, "displaced": int(rec["displaced"]),
            "n_cage": int(rec["n_cage"])}


def _merge_phases(ds: xr.Dataset, phases: xr.Dataset) -> xr.Dataset:
    """Carry the clustering results (cluster, region, dendrogram) of the phase table into ``ds``.

    Variables on the phase table's own ``neighbor``/``feature`` dims (its descriptor and cluster
    centres) are left out: ``ds`` holds the neighbour-vector table that PCA used.
    """
    carry = [
        name
        for name, var in phases.variables.items()
        if name not in ds.variables and not set(var.dims) & _PHASE_ONLY_DIMS
    ]
    out = ds.assign({name: phases[name] for name in carry if name in phases.data_vars})
    out = out.assign_coords({name: phases[name] for name in carry if name in phases.coords})
    for key, value in phases.attrs.items():
        if key.endswith("_params") and key not in ("neighborhoods_params",):
            out.attrs.setdefault(key, value)
    out.attrs["phase_neighborhoods_params"] = phases.attrs.get("neighborhoods_params", "{}")
    return out


Stage = Callable[[xr.Dataset, AnalysisParams], xr.Dataset]

#: The registry: stage name -> ``stage(ds, params) -> ds``, in the order they run.
STAGE_FUNCTIONS: Mapping[str, Stage] = MappingProxyType(
    {"align": align, "find": find, "refine": refine, "maps": maps, "neighborhoods": neighborhoods, "pca": pca,
     "phases": phases}
)
#: Names of the stages, in the order they run.
STAGES = tuple(STAGE_FUNCTIONS)


def check_stages(stages: Iterable[str] | str) -> tuple[str, ...]:
    """Stage names in the canonical order of :data:`STAGES`, without repeats ("all" or a comma list allowed).

    Raises
    ------
    InvalidParameterError
        For an unknown stage name.
    """
    if isinstance(stages, str):
        stages = STAGES if stages == "all" else [s.strip() for s in stages.split(",") if s.strip()]
    names = tuple(str(s) for s in stages)
    unknown = [s for s in names if s not in STAGE_FUNCTIONS]
    if unknown:
        raise InvalidParameterError(f"unknown steps {unknown}; choose from {list(STAGES)} (or 'all').")
    return tuple(s for s in STAGES if s in names)


def run_stages(
    ds: xr.Dataset,
    params: AnalysisParams,
    stages: Iterable[str] | str = STAGES,
    *,
    on_stage: Callable[[str], None] | None = None,
) -> xr.Dataset:
    """Run ``stages`` of the registry (in the order of :data:`STAGES`) and record ``analyze_params``.

    Parameters
    ----------
    ds : xarray.Dataset
        An atomds image Dataset.
    params : AnalysisParams
        The one parameters object every stage reads.
    stages : iterable of str or str
        Stage names (or "all", or a comma-separated list).
    on_stage : callable, optional
        Called with each stage name when it finishes.

    Returns
    -------
    xarray.Dataset
        The result, with the parameters object recorded as the ``analyze_params`` attribute
        (``{"params": ..., "stages": [...]}``).
    """
    names = check_stages(stages)
    for name in names:
        ds = STAGE_FUNCTIONS[name](ds, params)
        if on_stage is not None:
            on_stage(name)
    return record_params(ds, "analyze", {"params": params.to_dict(), "stages": list(names)})


def analyze(
    ds: xr.Dataset,
    *,
    k: int = 6,
    sort: str = "angle",
    n_clusters: int | None = None,
    n_components: int | None = None,
    model: str = "gaussian",
    contrast: str = "auto",
    find_kwargs: dict[str, Any] | None = None,
    params: AnalysisParams | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> xr.Dataset:
    """Run the local-crystallography pipeline on one image Dataset.

    Parameters
    ----------
    ds : xarray.Dataset
        An atomds image Dataset (``image(y, x)``, or ``frames(frame, y, x)``, which are aligned
        and summed first).
    k, sort, n_clusters, n_components, model, contrast
        As in :class:`AnalysisParams`.
    find_kwargs : dict, optional
        Extra arguments of ``find_atoms`` (template, threshold, ...): ``find_options``.
    params : AnalysisParams, optional
        All the options in one object (then no other option may be given).
    on_stage : callable, optional
        Called with each stage name of :data:`STAGES` when it finishes.

    Returns
    -------
    xarray.Dataset
        With atoms, fit results, the neighbour-vector table and its PCA modes, and the phase
        clustering: ``cluster`` (k-means on the ``"phase"`` descriptor, K from the dendrogram),
        ``region`` (clusters joined into phases and regions) and the merge tree; the parameters
        in the ``analyze_params`` attribute.
    """
    params = resolve_params(
        params, find_kwargs=find_kwargs,
        k=k, sort=sort, n_clusters=n_clusters, n_components=n_components, model=model, contrast=contrast,
    )
    return run_stages(ds, params, STAGES, on_stage=on_stage)


def resolve_params(
    params: AnalysisParams | None, *, find_kwargs: Mapping[str, Any] | None = None, **options: Any
) -> AnalysisParams:
    """``params``, or the :class:`AnalysisParams` of separate keyword options (not both).

    Raises
    ------
    InvalidParameterError
        When ``params`` is given together with options that differ from their defaults.
    """
    if params is None:
        return AnalysisParams.from_options(find_kwargs=find_kwargs, **options)
    if not isinstance(params, AnalysisParams):
        raise InvalidParameterError(f"params must be an AnalysisParams, got {type(params).__name__}.")
    defaults = AnalysisParams().to_dict()
    if find_kwargs or any(value != defaults[name] for name, value in options.items()):
        raise InvalidParameterError("give params= or the separate options, not both.")
    return params


# --------------------------------------------------------------------------------------------
# the command line: one definition of the options for `atomds analyze` and `atomds batch`
# --------------------------------------------------------------------------------------------


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a command-line option for each field of :class:`AnalysisParams` that has flags."""
    defaults = AnalysisParams()
    for f in dataclasses.fields(AnalysisParams):
        meta = f.metadata
        if not meta.get("flags"):
            continue
        kwargs = {k: v for k, v in meta.items() if k in ("type", "choices")}
        default = getattr(defaults, f.name)
        help_text = meta["help"] + (f" (default: {default})" if "default" not in meta["help"] and default is not None else "")
        parser.add_argument(*meta["flags"], dest=f.name, default=default, help=help_text, **kwargs)


def params_from_args(args: argparse.Namespace, **overrides: Any) -> AnalysisParams:
    """The :class:`AnalysisParams` of parsed arguments (fields with flags), with ``overrides``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(AnalysisParams) if f.metadata.get("flags")}
    return AnalysisParams.from_dict({**values, **overrides})
