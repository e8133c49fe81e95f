"""RGB patches of the scikit-image photographs (optimize.data.patches): the region split shares no pixel, shapes and
ranges, determinism, area downsampling, the judge's patches branch, the teacher's training data and bad configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from optimize import data

pytestmark = pytest.mark.usefixtures("one_thread")
R = data.PATCH_RES


def _coverage(pos: np.ndarray, shape: tuple[int, int], image: int) -> np.ndarray:
    """Boolean [H, W]: the pixels covered by the R x R windows at ``pos`` rows of ``image``."""
    start = np.zeros((shape[0] + 1, shape[1] + 1), dtype=np.int64)
    p = pos[pos[:, 0] == image]
    np.add.at(start, (p[:, 1], p[:, 2]), 1)
    # a window starting at (y, x) covers (y..y+R-1, x..x+R-1): box filter of the start indicator
    c = np.pad(start, ((R, 0), (R, 0))).cumsum(0).cumsum(1)
    box = c[R:, R:] - c[:-R, R:] - c[R:, :-R] + c[:-R, :-R]
    return box[: shape[0], : shape[1]] > 0


def test_regions_share_no_pixel_and_patches_stay_inside_their_region():
    images = data._patch_sources()[0]
    masks = {s: data.patch_region(s) for s in data.PATCH_SPLITS}
    heldout_pos, _ = data.patch_positions("heldout")
    val_pos, _ = data.patch_positions("validation")
    train_all = data._patch_positions("train")  # every crop position training can ever draw
    for k, img in enumerate(images):
        shape = img.shape[1:]
        m = [masks[s][k] for s in data.PATCH_SPLITS]
        assert not (m[0] & m[1]).any() and not (m[0] & m[2]).any() and not (m[1] & m[2]).any()
        assert m[0].any() and m[1].any() and m[2].any()  # every photograph is in every region
        cov_train = _coverage(train_all, shape, k)
        cov_ho, cov_val = _coverage(heldout_pos, shape, k), _coverage(val_pos, shape, k)
        assert not (cov_train & cov_ho).any() and not (cov_train & cov_val).any() and not (cov_ho & cov_val).any()
        assert not (cov_train & ~m[0]).any() and not (cov_ho & ~m[2]).any() and not (cov_val & ~m[1]).any()
    drawn, _ = data.patch_positions("train", 500, seed=3)
    assert {tuple(p) for p in drawn.tolist()} <= {tuple(p) for p in train_all.tolist()}


def test_shapes_ranges_and_fixed_sets():
    x = data.patches("train", 64, seed=0)
    ho, val = data.patches("heldout"), data.patches("validation")
    assert x.shape == (64, 3, R, R) and ho.shape == (2000, 3, R, R) and val.shape == (2000, 3, R, R)
    for t in (x, ho, val):
        assert t.dtype == torch.float32 and t.min() >= -1.0 and t.max() <= 1.0
    assert ho.std() > 0.2 and not torch.equal(ho[:100], val[:100])
    assert len({tuple(p) for p in data.patch_positions("heldout")[0].tolist()}) == 2000  # no repeated crop
    assert torch.equal(data.patches("heldout", 10), ho[:10])
    photos = data.patch_positions("heldout")[0][:, 0]
    assert set(photos.tolist()) == set(range(len(data.PATCH_IMAGES)))  # every photograph is represented


def test_determinism_flips_and_seeds():
    a = data.patches("train", 40, seed=5)
    assert torch.equal(a, data.patches("train", 40, seed=5))
    assert torch.equal(a[:7], data.patches("train", 7, seed=5))  # sample i depends on (seed, i) only
    assert not torch.equal(a, data.patches("train", 40, seed=6))
    pos, flip = data.patch_positions("train", 40, seed=5)
    assert 0 < flip.sum() < 40
    i = int(np.flatnonzero(flip)[0])
    k, y, x0 = pos[i]
    img = torch.from_numpy(data._patch_sources()[0][k])
    assert torch.equal(a[i], img[:, y:y + R, x0:x0 + R].flip(-1))  # a mirrored crop of its photograph
    j = int(np.flatnonzero(~flip)[0])
    k, y, x0 = pos[j]
    assert torch.equal(a[j], torch.from_numpy(data._patch_sources()[0][k])[:, y:y + R, x0:x0 + R])


def test_downsampling_is_area_averaging():
    for split, kw in (("train", {"n": 30, "seed": 2}), ("heldout", {"n": 30})):
        x32 = data.patches(split, **kw)
        for r in (16, 8):
            low = data.patches(split, resolution=r, **kw)
            f = R // r
            assert low.shape == (30, 3, r, r)
            blocks = x32.to(torch.float64).reshape(30, 3, r, f, r, f).mean(dim=(3, 5))
            torch.testing.assert_close(low, blocks.to(torch.float32), rtol=0, atol=1e-6)


def test_bad_arguments_name_the_valid_values():
    with pytest.raises(ValueError, match="valid splits"):
        data.patches("test", 3)
    with pytest.raises(ValueError, match="32, 16 or 8"):
        data.patches("train", 3, resolution=12)
    with pytest.raises(ValueError, match="n >= 0"):
        data.patches("train")
    with pytest.raises(ValueError, match="fixed set"):
        data.patches("heldout", seed=1)
    with pytest.raises(ValueError, match="0..2000"):
        data.patches("validation", 2001)
    assert data.get("patches") is data.patches


def test_cells_and_mirrored_cells():
    pos = np.array([[0, 0, 0], [0, 480, 480], [0, 0, 480]])
    assert data.patch_cells(pos, np.zeros(3, dtype=bool)).tolist() == [0, 15, 3]
    assert data.patch_cells(pos, np.ones(3, dtype=bool)).tolist() == [3, 12, 0]


def test_judge_branch_and_teacher_data():
    from optimize.evaluation.judge import REAL_N, Judge
    from optimize.methods.teacher import training_data

    mcfg = OmegaConf.create({"name": "patches", "data": "patches", "features": "raw", "clip": True,
                             "teacher": {"n_data": 12, "net": {"resolution": 16}}})
    judge = Judge.for_model(mcfg, (3, 16, 16), n_boot=0)
    assert set(judge.real) == {"train", "heldout"} and judge.clip
    assert torch.equal(judge.real["train"], data.patches("train", REAL_N, seed=1, resolution=16))
    assert torch.equal(judge.real["heldout"], data.patches("heldout", resolution=16))
    s = judge.score(data.patches("validation", 50, resolution=16))
    assert s["fd_heldout_raw"] > 0 and np.isfinite(s["kid_train_raw"])
    assert torch.equal(training_data(mcfg), data.patches("train", 12, seed=0, resolution=16))


def test_feature_nets_judge_other_sizes_resized_bicubically():
    """model=patches8: the shipped 32x32 feature nets see 8x8 samples and real sets resized bicubically to 32x32."""
    from torch.nn import functional as F

    from optimize.evaluation.classifier import load_classifier
    from optimize.evaluation.judge import feature_maps

    repo = Path(__file__).resolve().parents[1]
    paths = [str(repo / "checkpoints" / f) for f in ("features-patches.safetensors", "features-patches-b.safetensors")]
    maps = feature_maps(paths)
    x = data.patches("validation", 6, resolution=8)
    for name, path in zip(("main", "b"), paths):
        want = load_classifier(path).features(F.interpolate(x, size=32, mode="bicubic", align_corners=False))
        torch.testing.assert_close(maps[name](x), want)
        x32 = data.patches("validation", 6, resolution=32)
        torch.testing.assert_close(maps[name](x32), load_classifier(path).features(x32))  # 32x32 as it is


def test_bad_configs_fail_with_one_line(cli_error):
    assert "checkpoint" in cli_error(["evaluate", "model=patches", "model.checkpoint=/nonexistent/x.safetensors"])
    assert "nfe" in cli_error(["evaluate", "model=patches", "nfe=0"])
    assert "steps" in cli_error(["teacher", "model=patches", "steps=0"])
    assert "sigma_min" in cli_error(["evaluate", "model=patches", "sigma_min=90"])


def test_cli_exit_code_two_in_a_subprocess():
    repo = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "optimize", "teacher", "model=patches", "batch_size=0"], cwd=repo,
                       capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "batch_size" in lines[0]


def test_patch_feature_nets_train_and_round_trip(tmp_path: Path):
    from optimize.evaluation.classifier import load_classifier, patch_accuracies, save_classifier, train_patch_features

    pos, flip = data.patch_positions("train", 64, seed=9)
    x, photo, cell = data.patches("train", 64, seed=9), torch.from_numpy(pos[:, 0].copy()), torch.from_numpy(data.patch_cells(pos, flip))
    for arch, heads in (("patch_cnn", {"photo_accuracy", "cell_accuracy"}), ("patch_strided", {"rotation_accuracy", "photo_accuracy"})):
        net = train_patch_features({"arch": arch, "channels": 8, "feat": 16}, x, photo, cell, epochs=1, batch_size=32)
        acc = patch_accuracies(net, x, photo, cell)
        assert set(acc) == heads and all(0.0 <= v <= 1.0 for v in acc.values())
        path = save_classifier(net, {"arch": arch, "channels": 8, "feat": 16}, str(tmp_path / f"{arch}.safetensors"))
        back = load_classifier(path)
        assert torch.equal(back.features(x[:5]), net.features(x[:5])) and back.features(x[:5]).shape == (5, 16)
