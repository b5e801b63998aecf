"""The HTML report: index.html with existing, decodable, non-blank PNG figures, parameters and numbers."""

import json
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest

import atomds
from atomds.errors import InvalidParameterError

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from atomds.report import write_report  # noqa: E402


@pytest.fixture(scope="module")
def analysed():
    """A small two-phase image through the whole pipeline (find, refine, neighbourhoods, clusters, PCA)."""
    ds = atomds.datasets.two_phase(shape=192, seed=2).drop_dims("true_atom")
    return atomds.analyze(ds, n_clusters=3)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs.get("src"))
        for key in ("href", "src"):
            if attrs.get(key):
                self.links.append(attrs[key])


def _parse(index):
    parser = _Images()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser


SOURCE = "two-phase <test> & sample"


@pytest.fixture(scope="module")
def report(analysed, tmp_path_factory):
    return write_report(analysed, tmp_path_factory.mktemp("rep") / "report", source=SOURCE, dpi=50)


def test_report_figures_exist_and_render(report):
    assert report.name == "index.html" and report.parent.name == "report"
    assert report.is_file()
    parser = _parse(report)
    assert len(parser.srcs) >= 10
    for src in parser.srcs:
        path = report.parent / src
        assert path.is_file(), src
        with Image.open(path) as im:
            assert im.format == "PNG"
            gray = np.asarray(im.convert("L"), float)
        assert gray.shape[0] > 100 and gray.shape[1] > 100
        assert gray.std() > 10, f"{src} is nearly blank"


def test_report_is_self_contained_and_lists_numbers_and_parameters(analysed, report):
    text = report.read_text(encoding="utf-8")
    parser = _parse(report)
    for link in parser.links:
        assert not re.match(r"^[a-z]+:", link), f"external link {link!r}"
        assert not link.startswith("/") and ".." not in link
    assert "<script" not in text.lower()
    n_atoms = analysed.sizes["atom"]
    assert f"<th>atoms</th><td>{n_atoms}</td>" in text
    k = int(np.unique(analysed["cluster"].values[analysed["cluster"].values >= 0]).size)
    assert f"<th>clusters</th><td>{k} " in text
    if "region" in analysed:
        r = analysed["region"].values
        assert f"<th>regions (phases)</th><td>{np.unique(r[r >= 0]).size} " in text
    ratio = analysed["pca_explained_variance_ratio"].values
    assert f"{100 * ratio[0]:.1f} %" in text
    for key in ("find_atoms_params", "refine_params", "neighborhoods_params", "kmeans_params", "pca_params"):
        assert key in analysed.attrs
        step = key[: -len("_params")]
        assert re.search(rf"<h3[^>]*>{step}</h3>", text), step
        params = json.loads(analysed.attrs[key])
        assert all(f"<th>{name}</th>" in text for name in params)


def test_report_escapes_source(report):
    text = report.read_text(encoding="utf-8")
    assert SOURCE not in text and "two-phase &lt;test&gt; &amp; sample" in text


def test_report_rewrites_existing_report_in_place(analysed, report, tmp_path):
    target = tmp_path / "rep"
    shutil.copytree(report.parent, target)
    stale = target / "99_old_figure.png"
    stale.write_bytes(b"old")
    keep = target / "notes.txt"
    keep.write_text("mine")
    small = analysed.drop_vars([v for v in analysed.variables if v.startswith(("pca_", "mode_", "linkage_"))])
    small = small.drop_vars(["cluster", "region"], errors="ignore")
    index = write_report(small, target, dpi=40)
    srcs = _parse(index).srcs
    assert srcs and all((target / s).is_file() for s in srcs)
    assert not any("loading" in s or "cluster" in s for s in srcs)
    old_figures = {p.name for p in report.parent.iterdir() if p.suffix == ".png"} - set(srcs)
    assert old_figures and not any((target / name).exists() for name in old_figures), "old figures left behind"
    assert not stale.exists(), "a figure of the old report was left behind"
    assert keep.read_text() == "mine", "a file that is not a report figure was touched"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_report_with_atoms_only_skips_later_steps(tmp_path):
    ds = atomds.datasets.hexagonal(shape=96).drop_dims("true_atom").lcx.find_atoms()
    index = write_report(ds, tmp_path / "a", dpi=60)
    text = index.read_text(encoding="utf-8")
    srcs = _parse(index).srcs
    assert srcs and all((index.parent / s).is_file() for s in srcs)
    assert "Dendrogram" not in text and "Scree" not in text


def test_report_refuses_a_file_as_folder(analysed, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(InvalidParameterError, match="not a folder"):
        write_report(analysed, f)
    assert f.read_text() == "x"
