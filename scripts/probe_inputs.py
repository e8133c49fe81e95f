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
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

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

    from optimize import ddss, teacher
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
    overflow = c.clone()
    overflow[2, 1] = overflow[2, 2] = 1e308  # finite, but sampling overflows
    f["overflow_table"] = _save_raw_table(root / "overflow.safetensors", s, overflow, "{}")
    huge = c.clone()
    huge[1, 0] = 1e300
    f["huge_table"] = _save_raw_table(root / "huge.safetensors", s, huge, "{}")
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
    g("nan-samples", ["--table", f["overflow_table"], "--dtype", "float64", "--out", "o"], "evaluation 2")
    g("beyond-float32", ["--table", f["huge_table"], "--out", "o"], "float32")
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
            with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf):
                code, escaped = _call(probe)
        finally:
            os.chdir(cwd)
        out, err = out_buf.getvalue(), err_buf.getvalue()
    seconds = time.perf_counter() - t0
    new = sorted(_snapshot(work) - before)
    if probe.run_folder:  # a failed Hydra run may leave its own .hydra config and log, nothing else
        run = Path(probe.run_folder)
        rel = str(run.relative_to(work)) if run.is_absolute() and work in run.parents else str(run)
        new = [p for p in new if not (p == rel or p.startswith(rel + "/.hydra") or (p.startswith(rel + "/") and p.endswith(".log")))]
        if run.is_absolute() and run.exists():  # a run folder outside the working folder (resume=true siblings)
            extra = [str(p) for p in run.rglob("*") if ".hydra" not in p.parts and not p.name.endswith(".log")]
            new += extra
            shutil.rmtree(run, ignore_errors=True)
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
        chosen = [p for p in probes(fixtures) if selected in p.name and not (p.needs_user and root)]
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
