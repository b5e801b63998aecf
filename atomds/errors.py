"""Exceptions raised by atomds.

Every error atomds raises on purpose is an :class:`AtomdsError`; the subclasses also derive from
the matching built-in exception (``ValueError``, ``FileNotFoundError``, ...) so that generic
handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "AtomdsError",
    "FileMissingError",
    "UnreadableFileError",
    "UnsupportedFormatError",
    "DimensionError",
    "InvalidImageError",
    "InvalidParameterError",
    "TooFewAtomsError",
    "MissingVariableError",
    "MissingStepError",
    "NoAtomsFoundError",
    "SchemaValidationError",
    "SpectrumRegistrationError",
    "MESSAGE_MAX",
    "one_line",
]

#: Characters of an error message kept where it must fit on one line (the CLI, batch failure records).
MESSAGE_MAX = 2000


def one_line(message: str, limit: int = MESSAGE_MAX, *, hint: str = "") -> str:
    """``message`` on one line: its non-empty lines stripped and joined by spaces (a layout error lists
    its problems on the lines after its first), cut at ``limit`` characters with the full length and
    ``hint`` said at the cut."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    if len(text) > limit:
        tail = f" ... ({len(text)} characters{'; ' + hint if hint else ''})"
        text = text[: max(0, limit - len(tail))].rstrip() + tail
    return text


class AtomdsError(Exception):
    """Base class of all errors raised by atomds."""


class FileMissingError(AtomdsError, FileNotFoundError):
    """The path does not exist."""


class UnreadableFileError(AtomdsError, OSError):
    """The file exists but could not be read (corrupt, truncated, wrong content)."""


class UnsupportedFormatError(AtomdsError, ValueError):
    """The file extension is not a format atomds reads."""


class DimensionError(AtomdsError, ValueError):
    """An array or Dataset has the wrong number or names of dimensions."""


class InvalidImageError(AtomdsError, ValueError):
    """Image values that cannot be analysed: NaN/inf pixels, empty or constant images."""


class InvalidParameterError(AtomdsError, ValueError):
    """A parameter is out of its valid range (pixel_size <= 0, k >= atom count, ...)."""


class TooFewAtomsError(InvalidParameterError):
    """A statistic needs more (centre) atoms than the image holds: a crop of a few columns.

    ``atomds.analyze`` records such a stage as skipped instead of failing the image."""


class MissingVariableError(AtomdsError, KeyError):
    """A Dataset lacks a variable atomds needs (for example ``image``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingStepError(MissingVariableError):
    """A step was called before the step that produces its inputs."""


class NoAtomsFoundError(AtomdsError, RuntimeError):
    """Atom finding found no atoms."""


class SchemaValidationError(AtomdsError, ValueError):
    """A Dataset does not follow the atomds layout; the message lists every violation."""


class SpectrumRegistrationError(AtomdsError, ValueError):
    """A spectrum image is wrongly shaped or does not overlap the atoms."""
