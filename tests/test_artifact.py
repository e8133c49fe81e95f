"""Table files: exact round trip, atomic writes, and one clear sentence for every bad file."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from samplers import SolverTable, TableError, baselines
from samplers.artifact import FORMAT_NAME


def _write_raw(path, sigmas, coef, version="1", fmt=FORMAT_NAME, meta=None):
    header = {"format": fmt, "format_version": version, "metadata": json.dumps(meta or {})}
    save_file({"sigmas": torch.as_tensor(sigmas, dtype=torch.float64), "coef": torch.as_tensor(coef, dtype=torch.float64)},
              str(path), metadata=header)
    return str(path)


def test_round_trip_is_exact(tmp_path):
    table = baselines.build("unipc", 7, order=3, schedule="logsnr")
    table.metadata["model_fingerprint"] = "abc"
    path = table.save(str(tmp_path / "sub" / "t.safetensors"))
    back = SolverTable.load(path, fingerprint="abc")
    assert torch.equal(back.sigmas, table.sigmas) and torch.equal(back.coef, table.coef)
    assert back.metadata["method"] == "unipc" and back.metadata["config"] == {"order": 3}
    assert back.metadata["nfe"] == 7 and back.metadata["format_version"] == 1
    assert "package_version" in back.metadata
    assert os.listdir(tmp_path / "sub") == ["t.safetensors"]  # no temporary file left behind


def test_truncated_file(tmp_path):
    path = baselines.build("euler", 5).save(str(tmp_path / "t.safetensors"))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 40])
    with pytest.raises(TableError, match=r"t\.safetensors: truncated or corrupt table file"):
        SolverTable.load(path)
    open(path, "wb").write(data[:5])
    with pytest.raises(TableError, match=r"t\.safetensors: truncated or corrupt table file"):
        SolverTable.load(path)


def test_missing_file_and_wrong_format(tmp_path):
    with pytest.raises(TableError, match=r"nope\.safetensors: no such table file"):
        SolverTable.load(str(tmp_path / "nope.safetensors"))
    t = baselines.build("euler", 2)
    path = _write_raw(tmp_path / "w.safetensors", t.sigmas, t.coef, fmt="something-else")
    with pytest.raises(TableError, match="not a solver table"):
        SolverTable.load(path)


def test_wrong_format_version(tmp_path):
    t = baselines.build("euler", 2)
    path = _write_raw(tmp_path / "v.safetensors", t.sigmas, t.coef, version="99")
    with pytest.raises(TableError, match=r"v\.safetensors: table format version 99 is not supported"):
        SolverTable.load(path)


def test_nan_coefficients(tmp_path):
    t = baselines.build("euler", 3)
    coef = t.coef.clone()
    coef[1, 1] = float("nan")
    path = _write_raw(tmp_path / "n.safetensors", t.sigmas, coef)
    with pytest.raises(TableError, match=r"n\.safetensors: coef contains NaN or infinite values \(first at row 1"):
        SolverTable.load(path)


def test_causality_violation(tmp_path):
    t = baselines.build("euler", 3)
    coef = t.coef.clone()
    coef[0, t.d(2)] = 1.0
    path = _write_raw(tmp_path / "c.safetensors", t.sigmas, coef)
    with pytest.raises(TableError, match=r"c\.safetensors: causality violated: row 0 uses x_2 or d_2"):
        SolverTable.load(path)


def test_fingerprint_mismatch(tmp_path):
    t = baselines.build("euler", 3)
    t.metadata["model_fingerprint"] = "aaaa"
    path = t.save(str(tmp_path / "f.safetensors"))
    with pytest.raises(TableError, match="made for model fingerprint aaaa, but the model in use has fingerprint bbbb"):
        SolverTable.load(path, fingerprint="bbbb")
    generic = baselines.build("euler", 3).save(str(tmp_path / "g.safetensors"))
    SolverTable.load(generic, fingerprint="bbbb")  # a model-agnostic table loads for any model


def test_failed_save_leaves_existing_file_untouched(tmp_path):
    path = baselines.build("euler", 3).save(str(tmp_path / "t.safetensors"))
    before = open(path, "rb").read()
    bad = baselines.build("heun", 5)
    bad.metadata["config"] = {"not_json": object()}
    with pytest.raises(TableError, match="JSON-serialisable"):
        bad.save(path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["t.safetensors"]


def test_saved_tensors_are_float64_and_learned_tables_detach(tmp_path):
    base = baselines.build("dpmpp_2m", 4)
    learned = SolverTable(base.sigmas.clone().requires_grad_(True), base.coef.clone().requires_grad_(True),
                          {"method": "test"})
    path = learned.save(str(tmp_path / "l.safetensors"))
    back = SolverTable.load(path)
    assert back.coef.dtype == torch.float64 and not back.coef.requires_grad
    np.testing.assert_array_equal(back.coef.numpy(), base.coef.numpy())


@pytest.mark.parametrize("meta, kind", [("[1, 2]", "list"), ("3", "int"), ('"text"', "str"), ("null", "NoneType")])
def test_metadata_must_be_a_json_object(tmp_path, meta, kind):
    t = baselines.build("euler", nfe=3)
    path = str(tmp_path / "m.safetensors")
    save_file({"sigmas": t.sigmas, "coef": t.coef}, path, metadata={"format": FORMAT_NAME, "format_version": "1", "metadata": meta})
    with pytest.raises(TableError, match=rf"m\.safetensors: metadata must be a JSON object, got {kind}\."):
        SolverTable.load(path)


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64, torch.float16, torch.int64, torch.float32])
def test_tensors_must_be_float64(tmp_path, dtype):
    t = baselines.build("euler", nfe=3)
    path = str(tmp_path / "d.safetensors")
    save_file({"sigmas": t.sigmas.to(dtype), "coef": t.coef.to(dtype)}, path,
              metadata={"format": FORMAT_NAME, "format_version": "1", "metadata": "{}"})
    name = str(dtype).replace("torch.", "")
    with pytest.raises(TableError, match=rf"tensor sigmas is {name}; a table stores float64\."):
        SolverTable.load(path)


def test_metadata_nfe_must_match_the_tensors(tmp_path):
    t = baselines.build("euler", nfe=3)
    path = _write_raw(tmp_path / "n.safetensors", t.sigmas, t.coef, meta={"nfe": 5})
    with pytest.raises(TableError, match=r"metadata says nfe 5, but the tensors have nfe 3\."):
        SolverTable.load(path)
    ok = _write_raw(tmp_path / "ok.safetensors", t.sigmas, t.coef, meta={"nfe": 3, "n_noise": 1})
    assert SolverTable.load(ok).nfe == 3


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_reported_as_unreadable(tmp_path):
    path = baselines.build("euler", nfe=3).save(str(tmp_path / "u.safetensors"))
    os.chmod(path, 0)
    try:
        with pytest.raises(TableError, match=r"u\.safetensors: table file is not readable \(permission denied\)\."):
            SolverTable.load(path)
    finally:
        os.chmod(path, 0o600)


def test_folder_is_not_a_table(tmp_path):
    with pytest.raises(TableError, match=r"is a folder, not a table file\."):
        SolverTable.load(str(tmp_path))


@pytest.mark.parametrize("config, message", [
    ({"arch": "unet", "channels": -8}, r"unet network config channels must be an integer in 1\.\.4096, got -8\."),
    ({"arch": "unet", "channels": 4096, "channel_mult": [64, 64]}, r"asks for about .* parameters \(limit 2e\+09\)"),
    ({"arch": "mlp", "hidden": 10**9}, r"mlp network config hidden must be an integer"),
    ({"arch": "unet", "channel_mult": "abc"}, r"channel_mult must be a list"),
    ({"arch": "unet", "max_freq": float("inf")}, r"max_freq must be a positive finite number"),
    ([1, 2], r"network config must be a JSON object, got list"),
])
def test_network_configs_are_checked_before_allocating(tmp_path, config, message):
    from samplers import nets

    path = str(tmp_path / "n.safetensors")
    save_file({"w": torch.zeros(1)}, path, metadata={"format": nets.NET_FORMAT, "format_version": "1",
                                                     "config": json.dumps(config), "metadata": "{}"})
    with pytest.raises(nets.NetError, match=message):
        nets.load_net(path)
    assert nets.full_config({"arch": "unet"})["channels"] == 24  # the shipped sizes pass
