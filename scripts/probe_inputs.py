"""Hostile-input probes (issue 11): every class of bad input gets one ``error:`` line, exit 2, no traceback,
nothing written and nothing unpickled.

    python scripts/probe_inputs.py            # all probes, in this process; prints one line per failure and the counts
    python scripts/probe_inputs.py -v         # one line per probe
    python scripts/probe_inputs.py -k resume  # only probes whose name contains "resume"

Each probe runs ``python -m samplers ...`` or ``python -m optimize ...`` through its ``main`` in this process
(a fresh working folder per probe, stdout/stderr captured), so ~80 probes take seconds instead of minutes of
interpreter start-up; ``--subprocess`` runs each as its own process instead (the exact user experience).

A probe is *clean* when the exit status is 2, stderr holds exactly one line starting with ``error:`` (``note:``
lines aside), there is no traceback, no file appeared in its working folder (a probe that fails inside a Hydra
run may leave only that run's ``.hydra`` folder and log) and no planted pickle payload ran. Exit status 0 where
an error was due is *silent wrong*. The script exits 1 unless every probe is clean.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]

MARKER = "PAYLOAD_RAN"  # a planted pickle creates this folder in the probe's working folder if it is ever unpickled


class Payload:
    """Unpickling this creates MARKER in the working folder (harmless stand-in for arbitrary code)."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (MARKER,))


@dataclass
class Probe:
    name: str
    tool: str  # "samplers" | "optimize"
    argv: list[str]
    needle: str = ""  # text the error line must contain
    run_folder: str | None = None  # relative folder a Hydra run may create (.hydra and a log only)
    needs_user: bool = False  # meaningless as root (permissions are not enforced)
    expect_ok: bool = False  # a hostile input the command must handle and succeed on (exit 0), writing only in run_folder
    untouched: str | None = None  # a folder outside the working folder that must stay empty (path traversal)
    fault: int | None = None  # in-process only: the atomic file write after this many raises ENOSPC (disk full)
    keeps: str | None = None  # a folder the command keeps on purpose (an interrupted run's shards, for --resume)


@dataclass
class Result:
    probe: Probe
    code: int
    err: str
    out: str
    traceback: bool
    written: list[str] = field(default_factory=list)
    payload_ran: bool = False
    seconds: float = 0.0

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.err.strip().splitlines() if ln.strip() and not ln.startswith("note:")]

    @property
    def kind(self) -> str:
        """clean | traceback | silent wrong | unclean (a reason)."""
        if self.traceback:
            return "traceback"
        if self.probe.expect_ok:
            if self.code != 0:
                return f"unclean: exit {self.code} where success was due"
            return f"unclean: wrote {', '.join(self.written[:3])}" if self.written else "clean"
        if self.code == 0:
            return "silent wrong"
        if self.code != 2:
            return f"unclean: exit {self.code}"
        lines = self.error_lines
        if len(lines) != 1 or not lines[0].startswith("error: "):
            return f"unclean: {len(lines)} stderr lines"
        if self.probe.needle and self.probe.needle not in lines[0]:
            return f"unclean: message lacks {self.probe.needle!r}"
        if self.written:
            return f"unclean: wrote {', '.join(self.written[:3])}"
        if self.payload_ran:
            return "unclean: pickle payload ran"
        return "clean"


# --- fixtures ------------------------------------------------------------------------------------
def _save_raw_table(path: Path, sigmas: Any, coef: Any, metadata: str, fmt: str = "samplers.table") -> str:
    from safetensors.torch import save_file

    save_file({"sigmas": sigmas, "coef": coef}, str(path), metadata={"format": fmt, "format_version": "1", "metadata": metadata})
    return str(path)


def _save_raw_net(path: Path, config_json: str) -> str:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": "samplers.net", "format_version": "1",
                                                          "config": config_json, "metadata": "{}"})
    return str(path)


def _fake_checkpoint(path: Path, settings: dict[str, Any], run_settings: dict[str, Any]) -> str:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": 2, "hyper_parameters": settings, "run_settings": run_settings}, str(path))
    return str(path)


def make_fixtures(root: Path) -> dict[str, str]:
    """Every bad file the probes use, in ``root`` (never inside a probe's working folder)."""
    import torch
    from omegaconf import OmegaConf

    from optimize.methods import ddss

    from optimize.methods import teacher
    from optimize.cli import compose_config
    from samplers import baselines

    root.mkdir(parents=True, exist_ok=True)
    f: dict[str, str] = {}
    euler = baselines.build("euler", 4)
    s, c = euler.sigmas, euler.coef
    f["table"] = euler.save(str(root / "euler.safetensors"))
    for name, meta in (("meta_list", "[1, 2]"), ("meta_number", "3"), ("meta_string", '"hello"'), ("meta_null", "null"),
                       ("meta_deep", "[" * 100000 + "]" * 100000)):
        f[name] = _save_raw_table(root / f"{name}.safetensors", s, c, meta)
    f["bool_tensor"] = _save_raw_table(root / "bool.safetensors", s > 0, c != 0, "{}")
    f["complex_tensor"] = _save_raw_table(root / "complex.safetensors", s.to(torch.complex64), c.to(torch.complex64), "{}")
    f["half_tensor"] = _save_raw_table(root / "half.safetensors", s.half(), c.half(), "{}")
    f["nfe_mismatch"] = _save_raw_table(root / "nfe.safetensors", s, c, json.dumps({"nfe": 7}))
    f["nan_table"] = _save_raw_table(root / "nan.safetensors", s, torch.where(c != 0, c, c) * float("nan"), "{}")
    long = baselines.build("euler", 30)
    chain = long.coef.clone()
    for i in range(1, 31):
        chain[i, long.x(i - 1)] = 1e12  # allowed coefficients whose chain overflows the mixture at evaluation 13
    f["overflow_table"] = _save_raw_table(root / "overflow.safetensors", long.sigmas, chain, "{}")
    huge = c.clone()
    huge[1, 0] = 1e300  # finite, but beyond what any solver needs: sampling would overflow
    f["huge_table"] = _save_raw_table(root / "huge.safetensors", s, huge, "{}")
    f["rising_table"] = _save_raw_table(root / "rising.safetensors", s.flip(0), c, "{}")
    far = baselines.build("euler", 4, sigma_max=5000.0)
    f["far_table"] = _save_raw_table(root / "far.safetensors", far.sigmas, far.coef, "{}")
    # labels that try to choose where the project writes (path traversal, absolute, newline, very long)
    (root / "outside").mkdir()
    f["outside"] = str(root / "outside")
    for name, label in (("trav", "x/" + "../" * 20 + str(root / "outside").lstrip("/") + "/TRAV2"),
                        ("abs", str(root / "outside" / "ABS")), ("newline", "a\nb"), ("long", "L" * 5000), ("empty", "")):
        f[f"label_{name}"] = _save_raw_table(root / f"label_{name}.safetensors", s, c, json.dumps({"method": label}))
    f["label_trav_iia"] = _save_raw_table(root / "label_trav_iia.safetensors", s, c,
                                          json.dumps({"method": "x/" + "../" * 20 + str(root / "outside").lstrip("/") + "/IIA",
                                                      "base_solver": "euler"}))
    blob = Path(f["table"]).read_bytes()
    (root / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    f["truncated_table"] = str(root / "truncated.safetensors")
    (root / "garbage.safetensors").write_bytes(b"\x00garbage" * 10)
    f["garbage"] = str(root / "garbage.safetensors")
    (root / "unreadable.safetensors").write_bytes(blob)
    os.chmod(root / "unreadable.safetensors", 0)
    f["unreadable_table"] = str(root / "unreadable.safetensors")
    # planted pickles: zip (torch.save) and raw, under every name a loader might read
    torch.save({"state_dict": {}, "evil": Payload()}, str(root / "evil.ckpt"))
    f["evil_ckpt"] = str(root / "evil.ckpt")
    (root / "evil_raw.ckpt").write_bytes(pickle.dumps(Payload()))
    f["evil_raw_ckpt"] = str(root / "evil_raw.ckpt")
    shutil.copy(f["evil_ckpt"], root / "evil.safetensors")
    f["evil_safetensors"] = str(root / "evil.safetensors")
    shutil.copy(f["evil_raw_ckpt"], root / "evil.pkl")
    f["evil_pkl"] = str(root / "evil.pkl")
    (root / "truncated.ckpt").write_bytes(Path(f["evil_ckpt"]).read_bytes()[:100])
    f["truncated_ckpt"] = str(root / "truncated.ckpt")
    # network files
    f["net_negative"] = _save_raw_net(root / "neg.safetensors", json.dumps({"arch": "unet", "channels": -8}))
    f["net_absurd"] = _save_raw_net(root / "absurd.safetensors", json.dumps({"arch": "unet", "channels": 4096, "channel_mult": [64, 64]}))
    f["net_huge_width"] = _save_raw_net(root / "wide.safetensors", json.dumps({"arch": "mlp", "hidden": 10**9}))
    f["net_list"] = _save_raw_net(root / "list.safetensors", "[1, 2, 3]")
    f["net_mult"] = _save_raw_net(root / "mult.safetensors", json.dumps({"arch": "unet", "channel_mult": "abc"}))
    f["net_arch"] = _save_raw_net(root / "arch.safetensors", json.dumps({"arch": ["unet"]}))
    # a file where a folder belongs
    (root / "afile").write_text("x")
    f["afile"] = str(root / "afile")
    # --- diffusers folders with one thing wrong (a tiny UNet2DModel, built here), and callable targets as .py files
    from diffusers import DDPMScheduler, UNet2DModel
    from safetensors.torch import load_file, save_file

    def _tiny_vp(folder: Path, width: tuple[int, int] = (8, 16), classes: int | None = None) -> Path:
        torch.manual_seed(0)
        UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=width, layers_per_block=1,
                    norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                    num_class_embeds=classes).save_pretrained(folder / "unet", safe_serialization=True)
        DDPMScheduler().save_pretrained(folder / "scheduler")
        return folder

    def _vp_variant(name: str, unet: dict | None = None, sched: dict | None = None) -> Path:
        folder = root / "vp" / name
        shutil.copytree(root / "vp" / "ok", folder)
        for file, changes in ((folder / "unet" / "config.json", unet), (folder / "scheduler" / "scheduler_config.json", sched)):
            if changes:
                file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
        f[f"vp_{name}"] = str(folder)
        return folder

    _tiny_vp(root / "vp" / "ok")
    _tiny_vp(root / "vp" / "wide_src", width=(16, 32))
    f["vp_cond"] = str(_tiny_vp(root / "vp" / "cond", classes=3))
    _vp_variant("beta_schedule", sched={"beta_schedule": "bogus"})
    _vp_variant("timesteps0", sched={"num_train_timesteps": 0})
    _vp_variant("fourier", unet={"time_embedding_type": "fourier"})
    _vp_variant("sample_size0", unet={"sample_size": 0})
    _vp_variant("sample_size_huge", unet={"sample_size": 60000})
    _vp_variant("huge_net", unet={"block_out_channels": [100000, 200000]})
    _vp_variant("missing_tensor", unet={"num_class_embeds": 3})  # the weights have no class embedding
    wide = _vp_variant("width")
    shutil.copy(root / "vp" / "wide_src" / "unet" / "diffusion_pytorch_model.safetensors", wide / "unet")
    renamed = _vp_variant("renamed")  # same numbers, one tensor under a legacy attention name: found at load
    weights = renamed / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    sd["old.query.weight"] = sd.pop("conv_out.bias")
    save_file(sd, str(weights))
    truncated = _vp_variant("truncated")
    weights = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    f["targets"] = str(REPO / "tests" / "hostile_targets.py")  # user code that misbehaves
    (root / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    f["exits_on_import"] = str(root / "exits_on_import.py")
    digits = REPO / "checkpoints" / "diffusers-digits"
    for name, change in (("zsnr_string", {"rescale_betas_zero_snr": "yes"}),   # was read as True, silently
                         ("steps_huge", {"num_train_timesteps": 10**9}),        # was a 4 GB linspace in diffusers
                         ("betas_short", {"trained_betas": [0.1, 0.2]})):       # was accepted with 1000 train steps
        folder = root / f"diffusers_{name}"
        shutil.copytree(digits / "unet", folder / "unet")
        (folder / "scheduler").mkdir(parents=True)
        sched = json.loads((digits / "scheduler" / "scheduler_config.json").read_text())
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, **change}))
        f[f"diffusers_{name}"] = str(folder)
    # checkpoints of another run: same settings but the seed (ddss) / batch size (teacher)
    dcfg = compose_config(["method=ddss", "model=gmm", "nfe=4", "seed=7", "out_dir=unused"])
    hp = dict(ddss.build_module(dcfg).hparams)
    f["ddss_other_seed"] = _fake_checkpoint(root / "ddss_seed0.ckpt", {**hp, "seed": 0}, {"model": "gmm", "model_fingerprint": "x"})
    _fake_checkpoint(root / "runs" / "old" / "lightning" / "last.ckpt", {**hp, "seed": 0}, {"model": "gmm", "model_fingerprint": "x"})
    f["runs"] = str(root / "runs")
    tcfg = compose_config(["method=teacher", "model=toy2d", "model.teacher.n_data=64", "out_dir=unused"])
    thp = dict(teacher.build_module(tcfg).hparams)
    tset = teacher.run_settings(tcfg, int(OmegaConf.select(tcfg, "model.teacher.n_data")))
    f["teacher_other_batch"] = _fake_checkpoint(root / "teacher_bs.ckpt", thp, {**tset, "batch_size": tset["batch_size"] + 1})
    # learners: a model that is NaN below sigma 0.01, a ddss checkpoint with NaN table parameters
    from optimize.data.models import load_model

    ncfg = compose_config(["method=ddss", "model=gmm", "nfe=4", "out_dir=unused"])
    nmod = ddss.build_module(ncfg)
    nstate = {k: v.clone() for k, v in nmod.state_dict().items()}
    nstate["sampler.u"] = torch.full_like(nstate["sampler.u"], float("nan"))
    torch.save({"state_dict": nstate, "global_step": 2, "hyper_parameters": dict(nmod.hparams),
                "run_settings": {"model": "gmm", "model_fingerprint": load_model(ncfg.model, "cpu").fingerprint}},
               str(root / "ddss_nan.ckpt"))
    f["ddss_nan_ckpt"] = str(root / "ddss_nan.ckpt")
    return f


# --- the probes ----------------------------------------------------------------------------------
def probes(f: dict[str, str]) -> list[Probe]:
    """Every probe, by class (see issue 11)."""
    import torch

    gen = ["generate", "--no-progress"]
    E = ["--solver", "euler", "--nfe", "4"]
    P: list[Probe] = []

    def g(name: str, args: list[str], needle: str = "", **kw: Any) -> None:
        P.append(Probe(f"generate/{name}", "samplers", [*gen, *args], needle, **kw))

    # --out
    g("out-is-file", [*E, "--out", f["afile"]], "is a file")
    g("out-below-file", [*E, "--out", f["afile"] + "/x"], "below the file")
    g("out-empty", [*E, "--out", ""], "empty")
    g("out-not-writable", [*E, "--out", "/proc/x"], "not writable", needs_user=True)
    g("out-has-results", [*E, "--out", "full"], "--overwrite")
    g("out-has-other-files", [*E, "--out", "other"], "other files")
    g("partial-without-resume", [*E, "--out", "killed"], "--resume")
    g("resume-other-settings", [*E, "--seed", "5", "--out", "killed", "--resume"], "seed")
    g("resume-and-overwrite", [*E, "--out", "new", "--resume", "--overwrite"], "exclude")
    # sizes, seeds, devices, numbers
    g("n-too-large", [*E, "--n", str(10**13), "--out", "o"], "--n")
    g("nfe-too-large", ["--solver", "euler", "--nfe", str(10**7), "--out", "o"], "--nfe")
    g("batch-too-large", [*E, "--n", str(10**11), "--batch-size", str(10**11), "--out", "o"], "--batch-size")
    g("seed-overflow", [*E, "--seed", str(2**63 - 5), "--n", "10", "--out", "o"], "64 bits")
    g("seed-huge", [*E, "--seed", str(2**70), "--out", "o"], "64 bits")
    g("n-zero", [*E, "--n", "0", "--out", "o"], "--n")
    g("seed-negative", [*E, "--seed", "-1", "--out", "o"], "--seed")
    g("device-meta", [*E, "--device", "meta", "--out", "o"], "meta")
    g("device-nope", [*E, "--device", "nope", "--out", "o"], "nope")
    missing_cuda = "cuda:99" if torch.cuda.is_available() else "cuda"
    g("device-cuda-missing", [*E, "--device", missing_cuda, "--out", "o"], "cuda")
    g("rho-inf", [*E, "--rho", "inf", "--out", "o"], "--rho")
    g("rho-nan", [*E, "--rho", "nan", "--out", "o"], "--rho")
    g("rho-zero", [*E, "--rho", "0", "--out", "o"], "rho")
    g("sigma-max-1e30", [*E, "--sigma-max", "1e30", "--out", "o"], "--sigma-max")
    g("sigma-max-1e30-edm", [*E, "--sigma-max", "1e30", "--model", "edm", "--out", "o"], "--sigma-max")
    g("sigma-min-inf", [*E, "--sigma-min", "inf", "--out", "o"], "--sigma-min")
    g("sigma-min-above-max", [*E, "--sigma-min", "50", "--sigma-max", "10", "--out", "o"], "sigma_min")
    g("eta-nan", ["--solver", "ddim", "--nfe", "4", "--eta", "nan", "--out", "o"], "--eta")
    g("detail-inf", ["--solver", "tada", "--nfe", "4", "--detail", "inf", "--out", "o"], "--detail")
    g("order-absurd", ["--solver", "unipc", "--nfe", "4", "--order", "99", "--out", "o"], "order")
    g("label-unconditional", [*E, "--label", "3", "--out", "o"], "--label")
    # non-finite samples
    g("nan-samples", ["--table", f["overflow_table"], "--dtype", "float64", "--out", "o"], "evaluation 13")
    g("table-huge-coef", ["--table", f["huge_table"], "--out", "o"], "above 1e+12")
    g("table-rising-sigmas", ["--table", f["rising_table"], "--out", "o"], "must not increase")
    digits_vp = f"diffusers:{REPO / 'checkpoints' / 'diffusers-digits'}"
    g("table-sigma-beyond-model", ["--table", f["far_table"], "--model", digits_vp, "--out", "o"], "largest noise level")
    g("solver-sigma-beyond-model", [*E, "--sigma-max", "5000", "--model", digits_vp, "--out", "o"], "--sigma-max")
    for student in ("dsno-digits", "pagoda-patches16"):
        g(f"student-{student}-classic", [*E, "--model", f"edm:{REPO / 'checkpoints' / f'{student}.safetensors'}", "--out", "o"],
          "1-step student")
    g("student-multistep-table", ["--table", f["table"], "--model", f"edm:{REPO / 'checkpoints' / 'dsno-digits.safetensors'}",
                                  "--out", "o"], "1-step student")
    # disk full after the up-front space check: the finished shards are kept for --resume, and the error says so
    small = [*E, "--n", "12", "--batch-size", "4", "--out", "o"]
    g("disk-full-shards", small, "finished batch(es) of this process are kept", fault=2, keeps=".o.partial")
    g("disk-full-output", small, "all 3 batches are kept", fault=4, keeps=".o.partial")
    # table files
    for key, needle in (("meta_list", "JSON object"), ("meta_number", "JSON object"), ("meta_string", "JSON object"),
                        ("meta_null", "JSON object"), ("meta_deep", "metadata"), ("bool_tensor", "bool"),
                        ("complex_tensor", "complex"), ("half_tensor", "float16"), ("nfe_mismatch", "nfe"),
                        ("nan_table", "NaN"), ("truncated_table", "truncated"), ("garbage", "garbage"),
                        ("unreadable_table", "not readable"), ("evil_safetensors", "evil"), ("evil_pkl", "evil")):
        g(f"table-{key}", ["--table", f[key], "--out", "o"], needle, needs_user=key == "unreadable_table")
    g("table-is-folder", ["--table", str(Path(f["table"]).parent), "--out", "o"], "folder")
    g("table-is-network", ["--table", str(REPO / "checkpoints" / "edm-digits.safetensors"), "--out", "o"], "not a solver table")
    # network files
    for key, needle in (("net_negative", "channels"), ("net_absurd", "parameters"), ("net_huge_width", "hidden"),
                        ("net_list", "JSON object"), ("net_mult", "channel_mult"), ("net_arch", "architecture"),
                        ("evil_pkl", "evil"), ("evil_safetensors", "evil"), ("table", "not a network file")):
        g(f"model-{key}", [*E, "--model", f"edm:{f[key]}", "--out", "o"], needle)
    for key, needle in (("meta_list", "JSON object"), ("net_absurd", "parameters"), ("evil_pkl", "evil")):
        P.append(Probe(f"info/{key}", "samplers", ["info", f[key]], needle))

    # optimize: typed values, devices, paths, for every point of a sweep
    def o(name: str, args: list[str], needle: str = "", **kw: Any) -> None:
        P.append(Probe(f"optimize/{name}", "optimize", args, needle, **kw))

    ev = ["evaluate", "model=gmm"]
    o("n-abc", [*ev, "n=abc"], "n must be an integer")
    o("seed-abc", [*ev, "seed=abc"], "seed must be an integer")
    o("seed-negative", [*ev, "seed=-1"], "seed")
    o("seed-out-of-range", [*ev, "seed=5000000"], "seed")
    o("seed-float", [*ev, "seed=1.5"], "seed")
    o("substeps-abc", ["iia", "model=gmm", "substeps=abc"], "substeps")
    o("ridge-abc", ["iia", "model=gmm", "ridge=abc"], "ridge")
    o("ridge-negative", ["iia", "model=gmm", "ridge=-1"], "ridge")
    o("steps-abc", ["ddss", "model=gmm", "steps=abc"], "steps")
    o("teacher-steps-abc", ["teacher", "model=toy2d", "steps=abc"], "steps")
    o("lr-inf", ["ddss", "model=gmm", "lr=inf"], "lr")
    o("device-cuda", [*ev, f"device={missing_cuda}"], "cuda")
    o("device-nope", [*ev, "device=nope"], "device")
    o("dtype-bogus", ["evaluate", "model=edm", "model.dtype=bogus"], "model.dtype")
    o("dtype-float16", ["evaluate", "model=edm", "model.dtype=float16"], "model.dtype")
    o("devices-zero", ["iia", "model=gmm", "devices=0"], "devices")
    o("nfe-empty", [*ev, "nfe=[]"], "nfe")
    o("nfe-huge", [*ev, "nfe=100000000"], "nfe")
    o("grid-negative", [*ev, "grid=-1"], "grid")
    o("rho-inf", [*ev, "rho=inf"], "rho")
    o("sigma-max-inf", [*ev, "sigma_max=inf"], "sigma_max")
    o("checkpoint-is-table", ["evaluate", "model=edm", f"model.checkpoint={f['table']}"], "not a network file")
    o("checkpoint-is-pickle", ["evaluate", "model=edm", f"model.checkpoint={f['evil_pkl']}"], "evil")
    o("checkpoint-absurd", ["evaluate", "model=edm", f"model.checkpoint={f['net_absurd']}"], "parameters")
    o("cache-dir-is-file", [*ev, f"cache_dir={f['afile']}"], "cache_dir")
    o("cache-dir-below-file", [*ev, f"cache_dir={f['afile']}/x"], "below the file")
    o("run-dir-is-file", [*ev, f"hydra.run.dir={f['afile']}"], "hydra.run.dir")
    o("sweep-dir-is-file", ["-m", *ev, "nfe=4,6", f"hydra.sweep.dir={f['afile']}"], "hydra.sweep.dir")
    o("export-below-file", ["teacher", "model=toy2d", f"export={f['afile']}/t.safetensors"], "export")
    o("cfg-job-bad-model", ["--cfg", "job", "evaluate", "model=nope"], "unknown model")
    o("cfg-job-bad-key", ["--cfg", "job", "evaluate", "model=gmm", "nosuchkey=1"], "nosuchkey")
    o("sweep-late-bad-point", ["-m", *ev, "n=16,abc"], "abc")
    o("sweep-late-bad-seed", ["-m", *ev, "seed=0,-1"], "seed")
    o("table-bad-metadata", [*ev, f"table={f['meta_list']}"], "JSON object")
    o("table-rising-sigmas", [*ev, f"table={f['rising_table']}"], "must not increase")
    o("table-huge-coef", [*ev, f"table={f['huge_table']}"], "above 1e+12")
    o("student-multistep", ["evaluate", "model=edm", f"model.checkpoint={REPO / 'checkpoints' / 'dsno-digits.safetensors'}",
                            "solver=euler", "nfe=4", "hydra.run.dir=run"], "1-step student", run_folder="run")
    tiny = [*ev, "n=16", "ref_nfe=9", "n_boot=0", "grid=4", "hydra.run.dir=run", "cache_dir=run/cache"]
    o("evaluate-disk-full", [*tiny, "solver=euler", "nfe=4"], "not written: samples-euler-nfe4.png", fault=0, run_folder="run")
    # labels from a table file never choose where the project writes: the run succeeds, inside its run folder
    for name in ("trav", "abs", "newline", "long", "empty"):
        o(f"label-{name}", [*tiny, f"table={f[f'label_{name}']}"], run_folder="run", expect_ok=True, untouched=f["outside"])
    o("iia-base-label-trav", ["iia", "model=gmm", "nfe=4", "n_fit=16", "substeps=2", "evaluate=false", "hydra.run.dir=run",
                              f"base=table:{f['label_trav_iia']}"], run_folder="run", expect_ok=True, untouched=f["outside"])
    # one diffusers check in both CLIs (samplers.models.diffusers_spec), before the net is allocated
    for name, needle in (("beta_schedule", "beta_schedule 'bogus' is not supported"),
                         ("timesteps0", "num_train_timesteps must be an integer in [2, 100000], got 0"),
                         ("fourier", "Fourier time"),
                         ("sample_size0", "sample_size must be a positive integer"),
                         ("sample_size_huge", "more than the limit of 67,108,864"),
                         ("huge_net", "weights of another width"),
                         ("width", "weights of another width"),
                         ("missing_tensor", "lacks 1 tensor(s)"),
                         ("truncated", "not a readable safetensors file")):
        g(f"diffusers-{name}", ["--solver", "euler", "--nfe", "4", "--model", f"diffusers:{f[f'vp_{name}']}", "--out", "o"], needle)
        o(f"diffusers-{name}", ["iia", "model=diffusers", f"model.path={f[f'vp_{name}']}", "nfe=4"], needle)
    g("diffusers-renamed-tensor", ["--solver", "euler", "--nfe", "4", "--model", f"diffusers:{f['vp_renamed']}", "--out", "o"],
      "lack 1 tensor(s)")
    g("diffusers-cond-without-label", ["--solver", "euler", "--nfe", "4", "--model", f"diffusers:{f['vp_cond']}", "--out", "o"],
      "add --label K")
    # user code at the model boundary: exits, interrupts, a fingerprint() that raises, a huge shape, a stuck call
    cal = ["iia", "model=callable", "nfe=4"]
    o("callable-huge-shape", [*cal, f"model.target={f['targets']}:huge_shape"], "more than the limit of 67,108,864")
    o("callable-sys-exit", [*cal, f"model.target={f['targets']}:exits"], "raised SystemExit (sys.exit(0))")
    o("callable-keyboard-interrupt", [*cal, f"model.target={f['targets']}:interrupts"], "raised KeyboardInterrupt")
    o("callable-fingerprint-raises", [*cal, f"model.target={f['targets']}:bad_fingerprint"], "fingerprint() raised RuntimeError")
    o("callable-denoiser-exits", [*cal, f"model.target={f['targets']}:denoiser_exits"], "(SystemExit (sys.exit(3)))")
    o("callable-exits-on-import", [*cal, f"model.target={f['exits_on_import']}:make"], "cannot import")
    o("callable-timeout", [*cal, f"model.target={f['targets']}:sleeper", "model.timeout_s=0.5"],
      "model.timeout_s=0.5: a call of the denoiser")
    o("timeout-negative", [*cal, f"model.target={f['targets']}:sleeper", "model.timeout_s=-1"], "model.timeout_s must be")
    o("diffusers-zsnr-not-bool", ["evaluate", "model=diffusers", f"model.path={f['diffusers_zsnr_string']}"],
      "rescale_betas_zero_snr must be true or false")
    o("diffusers-train-steps-huge", ["evaluate", "model=diffusers", f"model.path={f['diffusers_steps_huge']}"],
      "num_train_timesteps must be an integer in [2, 100000]")
    o("diffusers-trained-betas-length", ["evaluate", "model=diffusers", f"model.path={f['diffusers_betas_short']}"],
      "trained_betas must be a list of num_train_timesteps = 1000")
    o("evaluate-nan-small-sigma", ["evaluate", "model=callable", f"model.target={f['targets']}:nan_small_sigma", "n=16",
                                   "ref_nfe=9", "n_boot=0", "hydra.run.dir=run", "cache_dir=run/cache"],
      "the reference solve (heun, 9 NFE)", run_folder="run")
    o("diffusers-sigma-max-1e6", ["evaluate", "model=diffusers", f"model.path={REPO / 'checkpoints' / 'diffusers-digits'}",
                                  "model.sigma_max=1e6"], "above the largest noise level")
    o("sigma-max-beyond-any-model", ["evaluate", "model=edm", "sigma_max=1e6"], "above 10000")
    # resume: never unpickle, never continue another run
    o("ddss-resume-evil", ["ddss", "model=gmm", f"resume={f['evil_ckpt']}"], "refused")
    o("ddss-resume-evil-raw", ["ddss", "model=gmm", f"resume={f['evil_raw_ckpt']}"], "refused")
    o("teacher-resume-evil", ["teacher", "model=toy2d", f"resume={f['evil_ckpt']}"], "refused")
    o("dsno-resume-evil", ["dsno", "model=edm", f"resume={f['evil_ckpt']}"], "refused")
    o("ddss-resume-truncated", ["ddss", "model=gmm", f"resume={f['truncated_ckpt']}"], "truncated")
    o("ddss-resume-table", ["ddss", "model=gmm", f"resume={f['table']}"], "resume checkpoint")
    o("ddss-resume-other-seed", ["ddss", "model=gmm", "nfe=4", "seed=7", "evaluate_at_end=false",
                                 f"resume={f['ddss_other_seed']}", "hydra.run.dir=run"], "seed=0", run_folder="run")
    o("ddss-resume-true-other-run", ["ddss", "model=gmm", "nfe=4", "seed=7", "evaluate_at_end=false", "resume=true",
                                     f"hydra.run.dir={f['runs']}/new"], "seed=0", run_folder=f"{f['runs']}/new")
    o("teacher-resume-other-batch", ["teacher", "model=toy2d", "model.teacher.n_data=64", f"resume={f['teacher_other_batch']}",
                                     "hydra.run.dir=run"], "batch_size", run_folder="run")
    # learners: ld3 has no resume, NaN models, compare entries with an end convention, pagoda inputs
    # ld3 has no resume: any resume= says to rerun (bit-identical), never reads the file
    o("ld3-resume-true", ["ld3", "model=gmm", "resume=true"], "ld3 has no resume")
    o("ld3-resume-path", ["ld3", "model=gmm", "resume=outputs/ld3/old-run"], "rerun the same command; its result is bit-identical")
    o("ld3-resume-evil", ["ld3", "model=gmm", f"resume={f['evil_ckpt']}"], "ld3 has no resume")  # never read
    # a model that passes the pre-check but gives NaN at small sigma: one line naming the evaluation and its sigma
    o("ld3-nan-small-sigma", ["ld3", "model=callable", f"model.target={f['targets']}:nan_small_sigma", "model.features=raw", "nfe=3",
                              "n_train=4", "n_valid=4", "rounds_v1=1", "rounds_v2=1", "evaluate=false", "hydra.run.dir=run"],
      "(sigma 0.00", run_folder="run")
    # resume= from a checkpoint whose table parameters are NaN: refused before work, naming the tensor and the step
    o("ddss-resume-nan", ["ddss", "model=gmm", "nfe=4", "evaluate_at_end=false", f"resume={f['ddss_nan_ckpt']}",
                          "hydra.run.dir=run"], "(step 2) holds NaN or infinite values in sampler.u", run_folder="run")
    # compare entries name the end convention as SOLVER:END
    o("ddss-compare-bad-end", ["ddss", "model=gmm", "compare=[ipndm:sideways]"], "the end convention after ':'")
    o("dsno-compare-tada-sigma-min", ["dsno", "model=edm", "compare=[tada:sigma_min]"], "tada")
    o("ld3-compare-bad-end", ["ld3", "model=gmm", "compare=[unipc:0]"], "the end convention after ':'")
    # pagoda: rec_features must be a patch_cnn feature-net file (a pickle is never loaded); the teacher must be RGB
    o("pagoda-rec-table", ["pagoda", "model=patches8", f"rec_features={f['table']}"], "is not a feature-net file")
    o("pagoda-rec-pickle", ["pagoda", "model=patches8", f"rec_features={f['evil_pkl']}"], "pickles are never loaded")
    o("pagoda-rec-evil-safetensors", ["pagoda", "model=patches8", f"rec_features={f['evil_safetensors']}"],
      "pickles are never loaded")
    o("pagoda-teacher-1-channel", ["pagoda", "model=patches8",
                                   f"model.checkpoint={REPO / 'checkpoints' / 'edm-digits.safetensors'}"], "(3 channels)")
    return P


# --- running -------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _prepare(work: Path) -> None:
    """The state some probes expect in their working folder (a finished output, a killed run, other files)."""
    (work / "full").mkdir()
    (work / "full" / "samples.npz").write_bytes(b"old")
    (work / "other").mkdir()
    (work / "other" / "notes.txt").write_text("mine")
    partial = work / ".killed.partial"
    partial.mkdir()
    from samplers import baselines
    from samplers.__main__ import run_identity

    ns = argparse.Namespace(model="gmm", n=64, seed=0, batch_size=256, dtype="float32", label=None)
    import torch

    from samplers.denoisers import GaussianMixture

    fingerprint = GaussianMixture.random().fingerprint()  # the gmm of --model gmm: only the seed differs from the probe
    ident = run_identity(ns, baselines.build("euler", 4), fingerprint, (1, 8, 8), torch.device("cpu"))
    (partial / "run.json").write_text(json.dumps(ident))


@contextlib.contextmanager
def _disk_full_after(writes: int | None) -> Any:
    """Every module's ``atomic_write_bytes`` (the one writer of tables, shards, grids and results) fails with ENOSPC
    after ``writes`` successful writes (None: no fault)."""
    if writes is None:
        yield
        return
    import errno

    from samplers import artifact

    real, done = artifact.atomic_write_bytes, [0]

    def full(path: str, data: bytes) -> str:
        if done[0] >= writes:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        done[0] += 1
        return real(path, data)

    patched = [m for m in list(sys.modules.values()) if getattr(m, "atomic_write_bytes", None) is real]
    for m in patched:
        m.atomic_write_bytes = full
    try:
        yield
    finally:
        for m in patched:
            m.atomic_write_bytes = real


def _call(probe: Probe) -> tuple[int, bool]:
    """The probe's main() in this process: (exit code, whether an exception escaped)."""
    try:
        if probe.tool == "samplers":
            from samplers.__main__ import main

            return int(main(probe.argv) or 0), False
        from optimize.cli import main as omain

        omain(probe.argv)
        return 0, False
    except SystemExit as exc:
        code = exc.code
        return (code if isinstance(code, int) else (0 if code is None else 1)), False
    except BaseException:  # noqa: BLE001 - an escaped exception is what this script counts
        traceback.print_exc()
        return 1, True


def run_probe(probe: Probe, base: Path, subprocess_mode: bool) -> Result:
    work = Path(tempfile.mkdtemp(prefix="probe-", dir=base))
    _prepare(work)
    before = _snapshot(work)
    cwd = os.getcwd()
    t0 = time.perf_counter()
    if subprocess_mode:
        r = subprocess.run([sys.executable, "-m", probe.tool, *probe.argv], cwd=work, capture_output=True, text=True,
                           timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
        code, out, err, escaped = r.returncode, r.stdout, r.stderr, False
    else:
        out_buf, err_buf = io.StringIO(), io.StringIO()
        os.chdir(work)
        try:
            with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf), _disk_full_after(probe.fault):
                code, escaped = _call(probe)
        finally:
            os.chdir(cwd)
        out, err = out_buf.getvalue(), err_buf.getvalue()
    seconds = time.perf_counter() - t0
    new = sorted(_snapshot(work) - before)
    if probe.run_folder:  # a failed Hydra run may leave its own .hydra config and log, nothing else
        run = Path(probe.run_folder)
        rel = str(run.relative_to(work)) if run.is_absolute() and work in run.parents else str(run)
        mine = (lambda p: p == rel or p.startswith(rel + "/")) if probe.expect_ok else \
            (lambda p: p == rel or p.startswith(rel + "/.hydra") or (p.startswith(rel + "/") and p.endswith(".log")))
        new = [p for p in new if not mine(p)]
        if run.is_absolute() and run.exists():  # a run folder outside the working folder (resume=true siblings)
            extra = [str(p) for p in run.rglob("*") if ".hydra" not in p.parts and not p.name.endswith(".log")]
            new += extra
            shutil.rmtree(run, ignore_errors=True)
    if probe.keeps:
        new = [p for p in new if not (p == probe.keeps or p.startswith(probe.keeps + "/"))]
    if probe.untouched and any(Path(probe.untouched).iterdir()):
        new += [str(p) for p in Path(probe.untouched).rglob("*")]
        for p in Path(probe.untouched).iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    payload = (work / MARKER).exists() or Path(cwd, MARKER).exists()
    return Result(probe, code, err, out, escaped or "Traceback (most recent call last)" in err, new, payload, seconds)


def summarize(results: list[Result]) -> dict[str, int]:
    kinds = [r.kind for r in results]
    return {"tried": len(results), "clean": kinds.count("clean"), "tracebacks": kinds.count("traceback"),
            "silent wrong": kinds.count("silent wrong"), "unclean": sum(k.startswith("unclean") for k in kinds)}


def run_all(selected: str = "", verbose: bool = False, subprocess_mode: bool = False,
            report: Callable[[str], None] = print) -> tuple[dict[str, int], list[Result]]:
    """Build the fixtures, run every probe (name containing ``selected``), return the counts and the results."""
    import torch

    torch.set_num_threads(1)
    base = Path(tempfile.mkdtemp(prefix="probe-inputs-"))
    try:
        fixtures = make_fixtures(base / "fixtures")
        root = os.geteuid() == 0 if hasattr(os, "geteuid") else False
        chosen = [p for p in probes(fixtures) if selected in p.name and not (p.needs_user and root)
                  and not (p.fault is not None and subprocess_mode)]  # a fault is injected in this process only
        results = []
        for probe in chosen:
            r = run_probe(probe, base, subprocess_mode)
            results.append(r)
            if verbose or r.kind != "clean":
                first = (r.error_lines or [r.err.strip().splitlines()[-1] if r.err.strip() else ""])[0]
                report(f"{r.kind:>14}  {probe.name:<34} {r.seconds:5.1f}s  {first[:160]}")
        counts = summarize(results)
        report("probes tried {tried} / clean {clean} / tracebacks {tracebacks} / silent wrong {silent wrong} / "
               "other unclean {unclean}".format(**counts))
        return counts, results
    finally:
        os.chmod(base / "fixtures" / "unreadable.safetensors", 0o600) if (base / "fixtures" / "unreadable.safetensors").exists() else None
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only probes whose name contains this")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per probe")
    parser.add_argument("--subprocess", action="store_true", help="run each probe as its own process")
    args = parser.parse_args(argv)
    counts, _ = run_all(args.k, args.verbose, args.subprocess)
    return 0 if counts["clean"] == counts["tried"] else 1


if __name__ == "__main__":
    sys.exit(main())
