"""A real diffusers client, end to end: train, learn tables, generate inside the pipeline, compare.

    python scripts/diffusers_end_to_end.py                 # every stage (about 30-40 min on 2 shared CPU cores)
    python scripts/diffusers_end_to_end.py --stage train   # or learn / compare / page

1. train: a small ``UNet2DModel`` on the 1,497 training digits (``optimize.data.digits``; never the held-out 300) the
   way diffusers' ``train_unconditional.py`` does: ``DDPMScheduler`` (1000 steps, linear betas), epsilon MSE loss,
   AdamW with warm-up and cosine decay, EMA weights, ``save_pretrained`` (safetensors) into
   ``checkpoints/diffusers-digits/`` (``unet/`` + ``scheduler/``).
2. learn: tables for it with the offline pipeline, ``model=diffusers model.path=checkpoints/diffusers-digits``:
   ``python -m optimize iia`` (needs no data) and ``python -m optimize ddss`` (KID loss on the training digits with
   the first digits feature net; selection on its own seeds against the training set) at NFE 4, 5, 6. Tables are
   copied to ``docs/results/diffusers/tables/``.
3. compare: every sampler runs INSIDE diffusers, through ``DDPMPipeline``'s loop (the standard loop with
   ``init_noise_sigma`` and ``scale_model_input``, which ``DDPMPipeline`` itself skips and EulerDiscreteScheduler
   needs): ``TableScheduler`` with each learned table, against ``DPMSolverMultistepScheduler``,
   ``UniPCMultistepScheduler`` and ``EulerDiscreteScheduler`` (created with ``from_config(pipe.scheduler.config)``,
   their defaults) at the same NFE, from the same latents (paired). Quality: FD/KID against the training and
   held-out digits on both digits feature nets with standard errors (``optimize.evaluation.judge``) and paired differences
   to the best diffusers scheduler (``optimize.evaluation.results.paired``). Time per image: interleaved repeats of the same
   batch, median. Writes ``docs/results/diffusers/{quality,timing,train}.csv`` and ``docs/results-diffusers.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*accelerate.*")

MODEL_DIR = REPO / "checkpoints" / "diffusers-digits"
RES_DIR = REPO / "docs" / "results" / "diffusers"
PAGE = REPO / "docs" / "results-diffusers.md"
NFES = (4, 5, 6)
FEATURES = ["checkpoints/classifier-digits.safetensors", "checkpoints/classifier-digits-b.safetensors"]
UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(24, 48), layers_per_block=1,
            norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- 1. train ----------------------------------------------------------------------------------
def train(steps: int, batch: int, lr: float, max_minutes: float, seed: int = 0) -> dict[str, Any]:
    """diffusers' unconditional training recipe on the digits training split; saves MODEL_DIR."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from optimize.data import digits

    torch.manual_seed(seed)
    x_train = digits("train")[0]  # [1497, 1, 8, 8] in [-1, 1]; the held-out digits are never used here
    unet = UNet2DModel(**UNET)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-6)
    lr_sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(200, steps // 10), num_training_steps=steps)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    gen = torch.Generator().manual_seed(seed)
    t0, done, losses = time.perf_counter(), 0, []
    unet.train()
    for step in range(steps):
        idx = torch.randint(0, len(x_train), (batch,), generator=gen)
        clean = x_train[idx]
        noise = torch.randn(clean.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        noisy = sched.add_noise(clean, noise, t)
        loss = torch.nn.functional.mse_loss(unet(noisy, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        losses.append(float(loss))
        done = step + 1
        if done % 250 == 0:
            log(f"train step {done}/{steps}: loss {np.mean(losses[-250:]):.4f}")
        if max_minutes and time.perf_counter() - t0 > 60 * max_minutes:
            log(f"train: stopped at step {done} (max_minutes={max_minutes})")
            break
    seconds = time.perf_counter() - t0
    ema.copy_to(unet.parameters())
    unet.eval()
    tmp = MODEL_DIR.with_name(MODEL_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp, safe_serialization=True)  # model_index.json, unet/, scheduler/
    shutil.rmtree(MODEL_DIR, ignore_errors=True)
    tmp.rename(MODEL_DIR)
    n_params = sum(p.numel() for p in unet.parameters())
    size = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    info = {"steps": done, "batch_size": batch, "lr": lr, "seconds": round(seconds, 1), "parameters": n_params,
            "folder_bytes": size, "final_loss_250": round(float(np.mean(losses[-250:])), 5), "threads": torch.get_num_threads()}
    RES_DIR.mkdir(parents=True, exist_ok=True)
    write_csv([info], RES_DIR / "train.csv")
    log(f"train: {done} steps in {seconds:.0f} s, {n_params} parameters, {size / 1e6:.2f} MB -> {MODEL_DIR}")
    return info


# --- 2. learn ----------------------------------------------------------------------------------
def run_optimize(args: list[str], log_path: Path) -> None:
    """``python -m optimize ARGS`` as a user runs it (its own process), output to ``log_path``."""
    cmd = [sys.executable, "-m", "optimize", *args]
    log(" ".join(["python -m optimize", *args]))
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed with exit code {rc} (log: {log_path}).")


def learn(which: str, ddss_steps: int, work: Path, ddss_nfes: list[int] | None = None, tag: str = "ddss") -> list[dict[str, Any]]:
    """IIA (no data) and DDSS (training digits, first feature net) tables at NFES via ``model=diffusers``."""
    tables = RES_DIR / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    model = ["model=diffusers", f"model.path={MODEL_DIR.relative_to(REPO)}"]
    rows = []
    if which in ("all", "iia"):
        out = work / "iia"
        t0 = time.perf_counter()
        run_optimize(["iia", *model, f"nfe=[{','.join(map(str, NFES))}]", "evaluate=false", f"hydra.run.dir={out}"],
                     work / "iia.log")
        sec = time.perf_counter() - t0
        for nfe in NFES:
            shutil.copy(out / f"iia-generic-diffusers-nfe{nfe}.safetensors", tables / f"iia-nfe{nfe}.safetensors")
            rows.append({"method": "iia", "nfe": nfe, "wall_seconds_all_nfe": round(sec, 1)})
    if which in ("all", "ddss"):
        for nfe in ddss_nfes or NFES:
            out = work / f"{tag}{nfe}"
            t0 = time.perf_counter()
            run_optimize(["ddss", *model, "data=digits", f"features=[{','.join(FEATURES)}]", f"nfe={nfe}",
                          f"steps={ddss_steps}", "evaluate_at_end=false", "progress_bar=false", "max_minutes=20",
                          f"hydra.run.dir={out}"], work / f"{tag}{nfe}.log")
            shutil.copy(out / f"ddss-ggdm-nfe{nfe}.safetensors", tables / f"{tag}-nfe{nfe}.safetensors")
            rows.append({"method": tag, "nfe": nfe, "wall_seconds": round(time.perf_counter() - t0, 1)})
    return rows


def ddss_record(work: Path, tag: str = "ddss") -> dict[int, dict[str, Any]]:
    """Steps run, training seconds and the selected step of each DDSS run, from its log ("ddss: N steps in S s
    (best validation at step B)"; max_minutes may stop a run before its steps)."""
    import re

    out = {}
    for nfe in NFES:
        path = work / f"{tag}{nfe}.log"
        m = re.search(r"ddss: (\d+) steps in (\d+) s \((?:best validation at step (\d+)|[^)]*)\)",
                      path.read_text()) if path.is_file() else None
        if m:
            out[nfe] = {"steps_run": int(m.group(1)), "train_seconds": int(m.group(2)),
                        "selected_step": None if m.group(3) is None else int(m.group(3))}
    return out



# --- 3. compare inside the pipeline -------------------------------------------------------------
def make_pipeline():
    """DDPMPipeline from MODEL_DIR (safetensors), and its subclass with the standard scaled loop."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.utils.torch_utils import randn_tensor  # noqa: F401

    class ScaledDDPMPipeline(DDPMPipeline):
        """DDPMPipeline's loop plus the two lines every sigma-space scheduler needs (latents x init_noise_sigma,
        scale_model_input), as StableDiffusionPipeline has them; given latents, raw output in [-1, 1] units."""

        @torch.no_grad()
        def __call__(self, latents: torch.Tensor, num_inference_steps: int) -> torch.Tensor:  # type: ignore[override]
            image = latents.to(self.unet.dtype) * self.scheduler.init_noise_sigma
            self.scheduler.set_timesteps(num_inference_steps)
            for t in self.scheduler.timesteps:
                model_output = self.unet(self.scheduler.scale_model_input(image, t), t).sample
                image = self.scheduler.step(model_output, t, image).prev_sample
            return image

    unet = UNet2DModel.from_pretrained(str(MODEL_DIR / "unet"), use_safetensors=True).eval().requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(str(MODEL_DIR / "scheduler"))
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    scaled = ScaledDDPMPipeline(unet=unet, scheduler=sched)
    scaled.set_progress_bar_config(disable=True)
    return pipe, scaled


def schedulers(config: Any, nfe: int) -> dict[str, Any]:
    """label -> scheduler at ``nfe``: the learned tables through TableScheduler and diffusers' own schedulers
    (defaults from the pipeline's config, and with Karras sigmas)."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    from samplers.diffusers_scheduler import TableScheduler

    out = {}
    for name in LEARNED_NAMES:
        path = RES_DIR / "tables" / f"{name}-nfe{nfe}.safetensors"
        if path.is_file():
            out[f"{name} (TableScheduler)"] = TableScheduler.from_table(path, config)
    for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler):
        out[cls.__name__] = cls.from_config(config)
        out[f"{cls.__name__} karras"] = cls.from_config(config, use_karras_sigmas=True)
    return out


LEARNED_NAMES = ("ddss", "ddss500", "iia")
LEARNED = tuple(f"{n} (TableScheduler)" for n in LEARNED_NAMES)
DDSS_STEPS = {"ddss": 250, "ddss500": 500}
KEYS = ("fd_train_main", "fd_heldout_main", "fd_train_b", "kid_train_main")


def compare(n: int, batch: int, reps: int, time_batch: int) -> None:
    """Quality (paired, same latents) and time per image of every scheduler at every NFE, inside the pipeline."""
    from omegaconf import OmegaConf

    from optimize.evaluation.judge import Judge
    from optimize.evaluation.results import paired
    from optimize.base.seeds import EVAL_SEED_OFFSET, seed_range
    from samplers import baselines, make_noise
    from samplers.diffusers_scheduler import TableScheduler

    pipe, scaled = make_pipeline()
    config = pipe.scheduler.config
    shape = (1, 8, 8)
    seeds = seed_range(EVAL_SEED_OFFSET, 0, n)
    latents = make_noise(1, shape, seeds)[0]  # one seed per sample: paired across schedulers, batch-independent
    mcfg = OmegaConf.create({"name": "diffusers-digits", "data": "digits", "features": FEATURES, "clip": True})
    judge = Judge.for_model(mcfg, shape, n_boot=200)
    rows, checks = [], []
    for nfe in NFES:
        scheds = schedulers(config, nfe)
        cur = []
        for label, sch in scheds.items():
            scaled.scheduler = sch
            t0 = time.perf_counter()
            x = torch.cat([scaled(latents[b:b + batch], nfe) for b in range(0, n, batch)])
            sec = time.perf_counter() - t0
            if not torch.isfinite(x).all():
                raise SystemExit(f"error: {label} at NFE {nfe} produced non-finite samples.")
            calls = count_calls(scaled, latents[:2], nfe)
            r = {"method": label, "nfe": nfe, "n": n, "unet_calls": calls, **judge.score(x), "seconds_quality_run": round(sec, 2)}
            cur.append(r)
            log(f"NFE {nfe} {label}: FD train {r['fd_train_main']:.3g} ± {r['fd_se_train_main']:.2g}, "
                f"held-out {r['fd_heldout_main']:.3g}, FD-b {r['fd_train_b']:.3g} ({calls} calls)")
            if isinstance(sch, TableScheduler):  # the stock DDPMPipeline (no scaling calls) gives the same images
                pipe.scheduler = sch
                g = torch.Generator().manual_seed(nfe)
                a = pipe(batch_size=16, generator=g, num_inference_steps=nfe, output_type="pt").images
                g = torch.Generator().manual_seed(nfe)
                from diffusers.utils.torch_utils import randn_tensor

                lat = randn_tensor((16, *shape), generator=g)  # DDPMPipeline's latents: e_0 x init_noise_sigma
                b = (scaled(lat / sch.init_noise_sigma, nfe) / 2 + 0.5).clamp(0, 1)
                checks.append({"check": "DDPMPipeline vs scaled loop", "method": label, "nfe": nfe,
                               "max_abs_diff": float((a - b).abs().max())})
        diff_rows = [r for r in cur if r["method"] not in LEARNED]
        ref = min(diff_rows, key=lambda r: r["fd_train_main"])  # best diffusers scheduler at this NFE (FD train)
        for r in cur:
            r["best_diffusers"] = ref["method"]
            for key in KEYS:
                if r is not ref:
                    d, se = paired(r, ref, key)
                    r[f"d{key}_vs_best_diffusers"], r[f"d{key}_vs_best_diffusers_se"] = d, se
            # against EVERY diffusers scheduler: the worst case of the learned row
            if r["method"] in LEARNED:
                for key in ("fd_train_main", "fd_heldout_main", "fd_train_b"):
                    zs = []
                    for o in diff_rows:
                        d, se = paired(r, o, key)
                        zs.append(d / se if se > 0 else float("inf"))
                    r[f"max_z_{key}_vs_all_diffusers"] = max(zs)  # < -2: better than every one beyond 2 se
        rows += cur
        # peer check on the trained model: a dpmpp_2m table on DPMSolverMultistepScheduler's own sigmas
        from diffusers import DPMSolverMultistepScheduler

        dpm = DPMSolverMultistepScheduler.from_config(config)
        dpm.set_timesteps(nfe)
        table = baselines.build("dpmpp_2m", nfe, sigmas=dpm.sigmas[:-1].double().tolist())
        ts = TableScheduler.from_table(table, config)
        lat = latents[:500]
        scaled.scheduler = dpm
        a = scaled(lat, nfe)
        scaled.scheduler = ts
        b = scaled(lat / ts.init_noise_sigma, nfe)
        checks.append({"check": "peer: dpmpp_2m table vs DPMSolverMultistepScheduler", "method": "dpmpp_2m", "nfe": nfe,
                       "max_abs_diff": float((a - b).abs().max()), "max_abs": float(a.abs().max())})
    from optimize.evaluation.results import public

    write_csv([public(r) for r in rows], RES_DIR / "quality.csv")
    write_csv(checks, RES_DIR / "checks.csv")
    timing(scaled, config, latents[:time_batch], reps)


def count_calls(scaled: Any, lat: torch.Tensor, nfe: int) -> int:
    calls = []
    hook = scaled.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        scaled(lat, nfe)
    finally:
        hook.remove()
    return len(calls)


class ZeroNet(torch.nn.Module):
    """A stand-in UNet returning zeros: times the scheduler's own work in the same loop."""

    def __init__(self, unet: Any):
        super().__init__()
        self.dtype_ = unet.dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_

    def forward(self, x: torch.Tensor, t: Any) -> Any:
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=torch.zeros_like(x))


def timing(scaled: Any, config: Any, lat: torch.Tensor, reps: int) -> None:
    """Median seconds per image over ``reps`` interleaved repeats of one batch, per scheduler and NFE; the bare
    forwards (N UNet calls on the same batch) and the scheduler-only loop (zero network) beside them."""
    unet = scaled.unet
    rows = []
    b = len(lat)
    for nfe in NFES:
        scheds = schedulers(config, nfe)
        ts = {k: [] for k in scheds}
        zero = {k: [] for k in scheds}
        bare = []
        t_in = torch.full((b,), 500.0)
        for rep in range(reps):
            with torch.no_grad():
                t0 = time.perf_counter()
                for _ in range(nfe):
                    unet(lat, t_in)
                bare.append(time.perf_counter() - t0)
            for label, sch in scheds.items():
                scaled.scheduler = sch
                t0 = time.perf_counter()
                scaled(lat, nfe)
                ts[label].append(time.perf_counter() - t0)
                scaled.unet = ZeroNet(unet)
                t0 = time.perf_counter()
                scaled(lat, nfe)
                zero[label].append(time.perf_counter() - t0)
                scaled.unet = unet
        for label in scheds:
            rows.append({"method": label, "nfe": nfe, "batch": b, "reps": reps,
                         "ms_per_image": 1e3 * float(np.median(ts[label])) / b,
                         "ms_per_image_min": 1e3 * float(np.min(ts[label])) / b,
                         "ms_per_image_max": 1e3 * float(np.max(ts[label])) / b,
                         "scheduler_ms_per_image": 1e3 * float(np.median(zero[label])) / b,
                         "bare_forwards_ms_per_image": 1e3 * float(np.median(bare)) / b})
        log(f"timing NFE {nfe}: " + ", ".join(f"{r['method']} {r['ms_per_image']:.3f}" for r in rows if r["nfe"] == nfe))
    for r in rows:  # ratios to DPMSolverMultistepScheduler at the same NFE
        dpm = next(o for o in rows if o["nfe"] == r["nfe"] and o["method"] == "DPMSolverMultistepScheduler")
        r["ratio_to_dpm_median"] = r["ms_per_image"] / dpm["ms_per_image"]
        r["ratio_to_dpm_min"] = r["ms_per_image_min"] / dpm["ms_per_image_min"]  # fastest repeat: least disturbed by load
        # derived: the same network cost for both, plus each loop's own (scheduler-only) cost
        r["ratio_to_dpm_derived"] = (dpm["bare_forwards_ms_per_image"] + r["scheduler_ms_per_image"]) / \
            (dpm["bare_forwards_ms_per_image"] + dpm["scheduler_ms_per_image"])
    write_csv(rows, RES_DIR / "timing.csv")
    meta = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform_cpu(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    (RES_DIR / "run.json").write_text(json.dumps(meta, indent=1) + "\n")


def platform_cpu() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or "unknown"


# --- 4. the page ----------------------------------------------------------------------------------
def fmt_opt(v: Any) -> str:
    return "-" if _f(v) is None else f"{_f(v):.3f}"


def _f(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def page() -> None:
    """docs/results-diffusers.md from the CSVs in docs/results/diffusers/ (every figure on the page is a CSV cell)."""
    from optimize.evaluation.report import NOTE, diff_text, fmt, table

    quality = read_csv(RES_DIR / "quality.csv")
    timing_rows = read_csv(RES_DIR / "timing.csv")
    checks = read_csv(RES_DIR / "checks.csv")
    train_info = (read_csv(RES_DIR / "train.csv") or [{}])[0]
    learn_rows = read_csv(RES_DIR / "learn.csv")
    run = json.loads((RES_DIR / "run.json").read_text()) if (RES_DIR / "run.json").is_file() else {}

    def pmc(r: dict[str, Any], key: str) -> str:
        metric, _, rest = key.partition("_")
        v, se = _f(r.get(key)), _f(r.get(f"{metric}_se_{rest}"))
        return f"{fmt(v)} ± {se:.2g}" if v is not None and se is not None else fmt(v)

    def dcell(r: dict[str, Any], key: str) -> str:
        d, se = _f(r.get(f"d{key}_vs_best_diffusers")), _f(r.get(f"d{key}_vs_best_diffusers_se"))
        return "(best diffusers)" if d is None else diff_text(d, se)

    lines = ["# A diffusers client, end to end (`scripts/diffusers_end_to_end.py`)", "",
             "Generated by `python scripts/diffusers_end_to_end.py` from the CSVs in `docs/results/diffusers/` "
             f"({run.get('date_utc', '?')}, {run.get('cpu', '?')}, torch {run.get('torch', '?')}, "
             f"{run.get('threads', '?')} thread(s)).", ""]
    lines += ["## The model", "",
              f"A `UNet2DModel` ({train_info.get('parameters', '?')} parameters, 8x8x1, block channels 24/48, one layer per "
              f"block; folder {int(_f(train_info.get('folder_bytes')) or 0) / 1e6:.2f} MB in `checkpoints/diffusers-digits/`) trained "
              f"the way diffusers' `train_unconditional.py` does: `DDPMScheduler` (1000 steps, linear betas), epsilon MSE, "
              f"AdamW lr {train_info.get('lr', '?')} with warm-up and cosine decay, EMA, `save_pretrained` (safetensors). "
              f"{train_info.get('steps', '?')} steps of batch {train_info.get('batch_size', '?')} on the 1,497 training digits "
              f"in {train_info.get('seconds', '?')} s on this CPU ({train_info.get('threads', '?')} thread; the run stops at "
              f"9 minutes, so the step count depends on the machine's load).", ""]
    lines += ["## Learned tables", "",
              "`python -m optimize iia model=diffusers model.path=checkpoints/diffusers-digits nfe=[4,5,6] evaluate=false` "
              "(no data needed; defaults: generic IIA over euler, trajectory target from Heun on the 8x refined grid) and "
              "`python -m optimize ddss model=diffusers model.path=checkpoints/diffusers-digits data=digits "
              "features=[checkpoints/classifier-digits.safetensors,checkpoints/classifier-digits-b.safetensors] nfe=N "
              "steps=250 max_minutes=20 evaluate_at_end=false` (GGDM from DDIM; KID loss on the training digits with the first "
              "feature net; table selected on its own seeds against the training set). Tables: `docs/results/diffusers/tables/`.", ""]
    if learn_rows:
        lines.append(table(["method", "NFE", "wall seconds (whole command)", "DDSS steps run / asked", "selected at step"],
                           [[r["method"], r["nfe"], fmt(_f(r.get("wall_seconds") or r.get("wall_seconds_all_nfe")))
                             + (" (all three NFE, one command)" if r.get("wall_seconds_all_nfe") else ""),
                             f"{r['steps_run']} / {r['steps_asked']}" if r.get("steps_run") else "-",
                             r.get("selected_step") or "-"] for r in learn_rows]))
        lines.append("`ddss500` is the same command with `steps=500`, run after the 250-step tables (`ddss`) had been "
                     "evaluated on this page, because every 250-step run still had its best validation FD (selection "
                     "seeds, training set) at its last step. Both are shown; neither replaces the other.\n")
        lines.append("DDSS runs stop at `max_minutes=20` of training (the steps run depend on the machine's load); "
                     "wall seconds include start-up, data and validation on this shared 2-core CPU.\n")
    lines += ["## Quality inside the pipeline", "",
              f"Every sampler runs in DDPMPipeline's loop from the same {quality[0].get('n', '?') if quality else '?'} latents "
              "(seed i for sample i), "
              "with the two lines sigma-space schedulers need (latents x `init_noise_sigma`, `scale_model_input`; the stock "
              "`DDPMPipeline` skips them, so EulerDiscreteScheduler cannot run in it). Diffusers' schedulers are made with "
              "`from_config(pipe.scheduler.config)` (their defaults) and with `use_karras_sigmas=True`. FD on the first "
              "digits feature net (CNN) against the training (1,497) and held-out (300) digits, FD-b on the second (MLP); "
              "the held-out digits and the second net are used by no learner and no selection. "
              "Δ: paired difference to the best diffusers scheduler at that NFE (lowest FD train), ± 1 se.", "", NOTE, ""]
    for nfe in NFES:
        rs = [r for r in quality if int(r["nfe"]) == nfe]
        if not rs:
            continue
        lines.append(f"### NFE {nfe}\n")
        lines.append(table(["scheduler", "UNet calls", "FD train", "FD held-out", "FD-b", "KID train",
                            "Δ FD train", "Δ FD held-out", "Δ FD-b"],
                           [[r["method"], r["unet_calls"], pmc(r, "fd_train_main"), pmc(r, "fd_heldout_main"),
                             pmc(r, "fd_train_b"), pmc(r, "kid_train_main"), dcell(r, "fd_train_main"),
                             dcell(r, "fd_heldout_main"), dcell(r, "fd_train_b")] for r in rs]))
    lines += ["## Goal: a learned table beats every diffusers scheduler at the same NFE", "",
              "Largest paired z = Δ / se of the learned table against each of the six diffusers schedulers at that NFE "
              "(below -2 on a measure: better than every one of them beyond 2 se on it).", ""]
    body = []
    for r in quality:
        if r["method"] in LEARNED:
            zs = [_f(r.get(f"max_z_{k}_vs_all_diffusers")) for k in ("fd_train_main", "fd_heldout_main", "fd_train_b")]
            won = [name for name, z in zip(("FD train", "FD held-out", "FD-b"), zs) if z is not None and z < -2]
            body.append([r["method"], r["nfe"], *[f"{z:+.2f}" if z is not None else "-" for z in zs],
                         ", ".join(won) if won else "none"])
    lines.append(table(["learned", "NFE", "max z FD train", "max z FD held-out", "max z FD-b",
                        "beats all six beyond 2 se on"], body))
    lines += ["## Time per image", "",
              "One batch of latents per NFE, every scheduler run in turn, repeated (interleaved); median ms per image. "
              "`bare forwards`: the N UNet calls alone on the same batch; `scheduler only`: the same loop with a UNet "
              "that returns zeros. Ratio to DPMSolverMultistepScheduler: direct (ratio of medians; this shared CPU makes "
              "single timings scatter), of the fastest repeats, and derived (the same network cost plus each loop's own measured cost).", ""]
    body = []
    for r in timing_rows:
        body.append([r["method"], r["nfe"], f"{_f(r['ms_per_image']):.3f} ({_f(r['ms_per_image_min']):.3f}-{_f(r['ms_per_image_max']):.3f})",
                     f"{_f(r['bare_forwards_ms_per_image']):.3f}", f"{1e3 * _f(r['scheduler_ms_per_image']):.1f}",
                     f"{_f(r['ratio_to_dpm_median']):.3f}", fmt_opt(r.get("ratio_to_dpm_min")),
                     f"{_f(r['ratio_to_dpm_derived']):.4f}"])
    if timing_rows:
        r0 = timing_rows[0]
        lines.append(f"Batch {r0['batch']}, {r0['reps']} repeats.\n")
    lines.append(table(["scheduler", "NFE", "ms / image, median (min-max)", "bare forwards ms / image",
                        "scheduler only us / image", "ratio to DPM (medians)", "ratio to DPM (minima)",
                        "ratio to DPM (derived)"], body))
    lines += ["## Checks", "",
              "The peer check on this model: a `dpmpp_2m` table on DPMSolverMultistepScheduler's own sigmas, run by "
              "TableScheduler, against that scheduler, same latents (500 samples); and TableScheduler inside the stock "
              "`DDPMPipeline` (which neither scales the latents nor calls `scale_model_input`) against the loop above "
              "(16 samples, output in [0, 1]).", ""]
    lines.append(table(["check", "method", "NFE", "max abs difference"],
                       [[c["check"], c["method"], c["nfe"], f"{_f(c['max_abs_diff']):.2g}"
                         + (f" (max abs value {_f(c['max_abs']):.3g})" if c.get("max_abs") else "")] for c in checks]))
    PAGE.write_text("\n".join(lines).rstrip() + "\n")
    log(f"wrote {PAGE}")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    from optimize.evaluation.results import write_csv as _write

    _write(rows, str(path))


def read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", default="all", choices=["all", "train", "learn", "record", "compare", "page"])
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--train-lr", type=float, default=1e-3)
    ap.add_argument("--train-max-minutes", type=float, default=9.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--learn", default="all", choices=["all", "iia", "ddss"])
    ap.add_argument("--ddss-steps", type=int, default=250)
    ap.add_argument("--ddss-tag", default="ddss", help="name of the DDSS tables (ddss, or ddss500 for the 500-step run)")
    ap.add_argument("--ddss-nfe", type=int, nargs="*", default=None, help="DDSS only at these NFE (default 4 5 6)")
    ap.add_argument("--n", type=int, default=2000, help="evaluation samples (seeds 0..n-1), paired across schedulers")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--time-reps", type=int, default=7)
    ap.add_argument("--time-batch", type=int, default=250)
    ap.add_argument("--work", default=str(REPO / "outputs" / "diffusers-e2e"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage in ("all", "train"):
        train(args.train_steps, args.train_batch, args.train_lr, args.train_max_minutes)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "learn"):
        rows = learn(args.learn, args.ddss_steps, work, args.ddss_nfe, args.ddss_tag)
        new = {(x["method"], int(x["nfe"])) for x in rows}
        old = [r for r in read_csv(RES_DIR / "learn.csv") if (r["method"], int(r["nfe"])) not in new]
        write_csv(old + rows, RES_DIR / "learn.csv")
    if args.stage in ("all", "learn", "record"):
        rows = read_csv(RES_DIR / "learn.csv")
        for tag in dict.fromkeys(r["method"] for r in rows if r["method"].startswith("ddss")):
            rec = ddss_record(work, tag)
            for r in rows:
                if r["method"] == tag and int(r["nfe"]) in rec:
                    r.update({"steps_asked": DDSS_STEPS.get(tag, 250), **rec[int(r["nfe"])]})
        for r in rows:
            r.pop("steps", None)
        write_csv(rows, RES_DIR / "learn.csv")
    if args.stage in ("all", "compare"):
        compare(args.n, args.batch, args.time_reps, args.time_batch)
    if args.stage in ("all", "compare", "page"):
        page()


if __name__ == "__main__":
    main()
