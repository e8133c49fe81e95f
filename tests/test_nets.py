"""samplers.nets: config-built networks, safetensors round trip, EDM denoiser loading, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from samplers import nets
from samplers.artifact import read_header


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    "config, low, high",
    [({"arch": "unet"}, 100_000, 300_000), ({"arch": "mlp"}, 20_000, 300_000)],
)
def test_default_sizes(config: dict, low: int, high: int) -> None:
    assert low <= _params(nets.build_net(config)) <= high


@pytest.mark.parametrize(
    "config",
    [
        {"arch": "unet", "precond": "edm", "sigma_data": 0.5},
        {"arch": "unet", "in_channels": 3, "resolution": 16, "channels": 16, "channel_mult": [1, 2, 2], "num_classes": 10},
        {"arch": "mlp", "in_dim": 2, "hidden": 64, "depth": 2},
    ],
)
def test_round_trip_identical_outputs(tmp_path, config: dict) -> None:
    torch.manual_seed(0)
    net = nets.build_net(config)
    shape = nets.data_shape(config)
    x, c_noise = torch.randn(5, *shape), torch.randn(5)
    cond = torch.arange(5) if config.get("num_classes") else None
    path = nets.save_net(net, config, str(tmp_path / "net.safetensors"), extra_metadata={"trained_steps": 7})
    loaded, cfg = nets.load_net(path)
    assert cfg["arch"] == config["arch"] and nets.data_shape(cfg) == shape
    with torch.no_grad():
        assert torch.equal(net.eval()(x, c_noise, cond), loaded(x, c_noise, cond))
    header = read_header(path)
    assert json.loads(header["metadata"])["trained_steps"] == 7
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_class_conditioning_changes_output_and_accepts_one_hot() -> None:
    torch.manual_seed(0)
    net = nets.build_net({"arch": "unet", "num_classes": 10}).eval()
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        by_label = net(x, c, labels)
        by_one_hot = net(x, c, torch.nn.functional.one_hot(labels, 10).float())
        assert torch.allclose(by_label, by_one_hot, atol=1e-6)
        assert not torch.allclose(by_label, net(x, c, None))


def test_load_denoiser_is_edm_preconditioned(tmp_path) -> None:
    from samplers.denoisers import EDMPrecond

    torch.manual_seed(0)
    config = {"arch": "unet", "precond": "edm", "sigma_data": 0.5}
    net = nets.build_net(config)
    path = nets.save_net(net, config, str(tmp_path / "teacher.safetensors"))
    den = nets.load_denoiser(path)
    assert isinstance(den, EDMPrecond) and den.shape == (1, 8, 8)
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.5, 2.0, 80.0])
    with torch.no_grad():
        expected = EDMPrecond(net.eval(), 0.5)(x, sigma)
        assert torch.equal(den(x, sigma), expected)
    assert den.fingerprint() == EDMPrecond(net, 0.5).fingerprint()
    assert den.fingerprint() != EDMPrecond(nets.build_net(config), 0.5).fingerprint()


def test_errors(tmp_path) -> None:
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(nets.NetError, match=r"nope\.safetensors: no such network file\."):
        nets.load_net(missing)
    with pytest.raises(nets.NetError, match=r"unknown network architecture 'resnet'; valid: unet, mlp, dsno_unet, pagoda_generator\."):
        nets.build_net({"arch": "resnet"})
    with pytest.raises(nets.NetError, match=r"unknown key\(s\) widht"):
        nets.build_net({"arch": "mlp", "widht": 3})
    with pytest.raises(nets.NetError, match="divisible"):
        nets.build_net({"arch": "unet", "resolution": 6, "channel_mult": [1, 2, 2]})
    # a table file is not a network file; a truncated network file is reported as such
    from samplers import baselines

    table = baselines.build("euler", 3).save(str(tmp_path / "t.safetensors"))
    with pytest.raises(nets.NetError, match="not a network file"):
        nets.load_net(table)
    path = nets.save_net(nets.build_net({"arch": "mlp"}), {"arch": "mlp"}, str(tmp_path / "m.safetensors"))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) - 1000])
    with pytest.raises(nets.NetError, match="m.safetensors: truncated"):
        nets.load_net(path)
    # weights that do not fit the config
    other = nets.save_net(nets.build_net({"arch": "mlp"}), {"arch": "mlp", "hidden": 64}, str(tmp_path / "x.safetensors"))
    with pytest.raises(nets.NetError, match="weights do not match the stored config"):
        nets.load_net(other)
    bad_precond = nets.save_net(nets.build_net({"arch": "mlp"}), {"arch": "mlp", "precond": "vp"}, str(tmp_path / "p.safetensors"))
    with pytest.raises(nets.NetError, match="unknown preconditioning 'vp'"):
        nets.load_denoiser(bad_precond)
