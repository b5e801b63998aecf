"""The one home of the ``<step>_params`` attributes: writing, reading and recorded fallbacks.

Every step records the parameters it used (given or estimated) as a JSON string attribute
``<step>_params`` of the Dataset it returns (NetCDF attributes are flat, so nested values are a JSON
string). This module is the only code that writes or parses them; everything else (ops, plots, the
report, the library, the CLI) calls :func:`step_params` or :func:`all_step_params`.

A *fallback* is a path taken because the preferred one could not be (despiking skipped on an
unusual image, a finding pass dropped, a calibration not understood). :func:`note_fallback` records
it in the step's parameters under ``"fallbacks"`` and warns once per process and kind, so that no
fallback is silent.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import numpy as np

__all__ = [
    "AtomdsWarning",
    "FallbackWarning",
    "to_jsonable",
    "record_params",
    "step_params",
    "all_step_params",
    "note_fallback",
]

_SUFFIX = "_params"


class AtomdsWarning(UserWarning):
    """Base class of the warnings atomds issues."""


class FallbackWarning(AtomdsWarning):
    """A step took a fallback path; the step's ``<step>_params`` attribute says which and why."""


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and ranges to JSON-serialisable values.

    Arrays of more than 64 elements are summarised by their shape and dtype; non-finite floats
    become strings (``"nan"``, ``"inf"``) because JSON has no literal for them.
    """
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, range)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        if value.size > 64:
            return f"<array shape={list(value.shape)} dtype={value.dtype}>"
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _attrs(obj: Any) -> Mapping[str, Any]:
    attrs = getattr(obj, "attrs", obj)
    if not isinstance(attrs, Mapping):
        raise TypeError(f"expected a Dataset, DataTree node or attribute mapping, got {type(obj).__name__}")
    return attrs


def record_params(ds: Any, step: str, params: Mapping[str, Any]) -> Any:
    """Return a shallow copy of ``ds`` with ``params`` stored as the JSON attribute ``<step>_params``."""
    out = ds.copy(deep=False)
    out.attrs = {**ds.attrs, f"{step}{_SUFFIX}": json.dumps(to_jsonable(dict(params)), sort_keys=True)}
    return out


def _parse(raw: Any, key: str) -> dict[str, Any]:
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        value = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"attribute {key!r} is not a JSON object: {str(raw)[:80]!r} ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"attribute {key!r} is not a JSON object: {str(raw)[:80]!r}")
    return value


def step_params(ds: Any, step: str, *, default: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The parameters recorded by ``step`` on ``ds`` (a Dataset, DataTree node or attrs mapping).

    Returns ``default`` (``None`` unless given) when the step has not run. An attribute that is not a
    JSON object raises :class:`ValueError` naming it: unreadable parameters are never read as empty.
    """
    key = f"{step}{_SUFFIX}"
    attrs = _attrs(ds)
    if key not in attrs:
        return None if default is None else dict(default)
    return _parse(attrs[key], key)


def all_step_params(ds: Any) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """``(step, parameters)`` for every ``<step>_params`` attribute, in the order recorded.

    An attribute that is not a JSON object is yielded as its raw string (for display), not dropped.
    """
    for key, raw in _attrs(ds).items():
        if not str(key).endswith(_SUFFIX):
            continue
        try:
            value: dict[str, Any] | str = _parse(raw, key)
        except ValueError:
            value = str(raw)
        yield str(key)[: -len(_SUFFIX)], value


_WARNED: set[str] = set()


def note_fallback(params: MutableMapping[str, Any], kind: str, message: str, *, warn: bool = True) -> None:
    """Record a fallback in a step's ``params`` (under ``"fallbacks"``) and warn once per ``kind``.

    Parameters
    ----------
    params : dict
        The step's parameters, about to be recorded with :func:`record_params`.
    kind : str
        A short stable name of the fallback (``"despike_skipped"``); the warning is issued once per
        process for each kind, the record is made every time.
    message : str
        What was done instead, and why, in words a user can act on.
    warn : bool
        Issue a :class:`FallbackWarning` (once per kind); False records only.
    """
    params.setdefault("fallbacks", {})[kind] = message
    if warn and kind not in _WARNED:
        _WARNED.add(kind)
        warnings.warn(f"{message} (recorded under 'fallbacks' in the step's params)", FallbackWarning, stacklevel=3)
