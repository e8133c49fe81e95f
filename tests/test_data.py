"""Datasets: shapes, ranges, dtypes, determinism, the fixed digits split and shapes downsampling."""

from __future__ import annotations

import pytest
import torch

from optimize import data
from samplers.denoisers import GaussianMixture

pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_split_sizes_ranges_and_no_overlap():
    x_tr, y_tr = data.digits("train")
    x_ho, y_ho = data.digits("heldout")
    x_all, y_all = data.digits("all")
    assert x_tr.shape == (1497, 1, 8, 8) and x_ho.shape == (300, 1, 8, 8) and x_all.shape == (1797, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert x_all.min() == -1.0 and x_all.max() == 1.0
    assert torch.equal(torch.bincount(y_ho, minlength=10), torch.full((10,), 30))  # stratified
    tr, ho = data.digits_split_indices()
    assert len(set(tr.tolist()) & set(ho.tolist())) == 0 and sorted(tr.tolist() + ho.tolist()) == list(range(1797))
    assert ho[:8].tolist() == [2, 12, 20, 28, 53, 68, 72, 77] and int(ho.sum()) == 286495  # pinned split
    assert torch.equal(x_all[tr], x_tr) and torch.equal(y_all[ho], y_ho)
    assert torch.equal(data.digits("train")[0], x_tr)  # fixed
    with pytest.raises(ValueError, match="valid splits"):
        data.digits("test")


def test_toy2d_kinds_unit_std_and_seeded():
    for kind in ("checkerboard", "ring"):
        a = data.toy2d(20_000, seed=3, kind=kind)
        assert a.shape == (20_000, 2) and a.dtype == torch.float32
        assert torch.allclose(a.std(0), torch.ones(2), atol=0.03) and a.mean(0).abs().max() < 0.05
        assert torch.equal(a, data.toy2d(20_000, seed=3, kind=kind))
        assert not torch.equal(a, data.toy2d(20_000, seed=4, kind=kind))
    board = data.toy2d(5000, seed=0) / (3**0.5 / 2) + 2  # back to [0, 4]^2 board coordinates
    cells = board.floor()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()  # only dark cells
    with pytest.raises(ValueError, match="valid kinds"):
        data.toy2d(3, kind="moons")


def test_shapes_determinism_range_and_downsampling():
    x32 = data.shapes(40, seed=7)
    assert x32.shape == (40, 1, 32, 32) and x32.dtype == torch.float32
    assert x32.min() >= -1.0 and x32.max() <= 1.0 and x32.min() == -1.0
    assert torch.equal(x32, data.shapes(40, seed=7))
    assert torch.equal(x32[:10], data.shapes(10, seed=7))  # sample i depends on (seed, i) only
    assert not torch.equal(x32, data.shapes(40, seed=8))
    # anti-aliased: fractional coverage values exist on edges
    frac = ((x32 > -1.0) & (x32 < x32.amax(dim=(1, 2, 3), keepdim=True))).sum()
    assert frac > 0
    for r in (16, 8):
        low = data.shapes(40, seed=7, resolution=r)
        assert low.shape == (40, 1, r, r)
        torch.testing.assert_close(low, torch.nn.functional.avg_pool2d(x32, 32 // r), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="32, 16 or 8"):
        data.shapes(2, resolution=12)


def test_gmm_model_and_registry():
    m = data.gmm_model((1, 8, 8), components=4, seed=1)
    assert isinstance(m, GaussianMixture) and m.shape == (1, 8, 8) and m.means.shape[0] == 4
    assert m.fingerprint() == GaussianMixture.random((1, 8, 8), components=4, seed=1).fingerprint()
    assert set(data.DATASETS) == {"digits", "toy2d", "shapes", "gmm", "patches", "captioned-digits"}
    g = data.get("gmm")(16, seed=0)
    assert g.shape == (16, 1, 8, 8) and g.dtype == torch.float32
    assert torch.equal(g, data.get("gmm")(16, seed=0))
    assert data.get("shapes") is data.shapes
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; valid datasets are captioned-digits, digits, gmm, patches, shapes, toy2d."):
        data.get("cifar")
