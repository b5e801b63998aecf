"""The residual passes at the border and on predicted sites (dim sublattices beside bright columns)."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from atomds.core import find, samples
from atomds.core.find.residual import _inside_energy, _matched_filter


def test_inside_energy_is_the_kernel_summed_over_offsets_inside_the_image():
    k = np.random.default_rng(0).random((9, 9))
    for shape in ((20, 31), (9, 9), (40, 12)):
        want = ndi.correlate(np.ones(shape), k, mode="constant")
        np.testing.assert_allclose(_inside_energy(k, shape), want, rtol=1e-12, atol=1e-12)


def test_matched_filter_is_calibrated_up_to_the_border():
    # pure noise of known variance: z is a unit normal everywhere, in the border strip too
    # (it was shrunk there by the energy of the template outside the image)
    rng = np.random.default_rng(1)
    var = 25.0
    zs = []
    for _ in range(6):
        res = rng.normal(0.0, np.sqrt(var), (96, 96))
        z, _ = _matched_filter(res, np.zeros_like(res), 2.0, (var, 0.0))
        zs.append(np.r_[z[:2].ravel(), z[-2:].ravel(), z[:, :2].ravel(), z[:, -2:].ravel()])
    edge = np.concatenate(zs)
    assert 0.9 < np.std(edge) < 1.1


@pytest.mark.parametrize("seed", [100, 103])
def test_dim_sublattice_of_a_honeycomb_at_snr_9(seed):
    # B at 30 % of A's peak, 500 counts per A column: the dim column's matched-filter SNR is 9.3
    s = samples.honeycomb_sample(shape=384, dose=500.0, dim_ratio=0.3, seed=seed)
    res = find.find_atoms(s.image)
    sc = samples.score_positions(np.c_[s.x, s.y], np.c_[res.x, res.y], shape=s.shape, true_label=s.label)
    assert sc["recall_by_label"][int(s.label.max())] >= 0.995
    assert sc["false_positive_rate"] <= 0.002
