"""The version of atomds (one definition; ``atomds.__version__`` re-exports it)."""

__version__ = "0.1.0"
