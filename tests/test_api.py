"""The public surface: accessor forwarders resolve, imports stay light, layers stay apart."""

import inspect
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import atomds
from atomds.accessor import LcxAccessor, _Forward

SRC = pathlib.Path(atomds.__file__).parent


def _forwarders():
    return [name for name, value in vars(LcxAccessor).items() if isinstance(value, _Forward)]


@pytest.mark.parametrize("name", _forwarders())
def test_accessor_method_resolves_to_a_documented_function(name):
    func = getattr(LcxAccessor, name)
    assert callable(func)
    assert func.__doc__ and len(func.__doc__) > 40, f"{name} needs a docstring"
    params = list(inspect.signature(func).parameters.values())
    assert params, name
    # arguments after the Dataset are keyword-only, except a single leading positional where issues say so
    positional = [p for p in params[1:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) <= 2, f"{name}: {positional}"


def test_bound_method_has_the_function_signature():
    ds = atomds.from_array(np.arange(64.0).reshape(8, 8))
    sig = inspect.signature(ds.lcx.to_netcdf)
    assert list(sig.parameters) == ["path"]


def test_import_is_light():
    code = (
        "import sys, atomds; heavy = [m for m in ('matplotlib', 'holoviews', 'hvplot', 'distributed', 'sklearn')"
        " if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import atomds pulled in {out}"


def test_core_is_pure():
    for path in (SRC / "core").glob("*.py"):
        text = path.read_text()
        for forbidden in ("import xarray", "from xarray", "import dask", "from dask", "from ..ops", "from atomds.ops"):
            assert forbidden not in text, f"{path.name} imports {forbidden!r}: core/ must stay pure NumPy/SciPy"


def test_accessor_only_forwards():
    text = (SRC / "accessor.py").read_text()
    for forbidden in ("import numpy", "np.", "scipy", "sklearn"):
        assert forbidden not in text
