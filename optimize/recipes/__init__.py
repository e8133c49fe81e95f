"""Recipes, the top layer below the CLI (imports every layer; runs methods as their own processes). What the
``best`` command and the results scripts share: the recipe that makes the shipped tables, the selection rule, a sample cache keyed by
table and the benchmarks' output files.

The recipe (``scripts/results_learned.py --fit``, ``scripts/results_patches.py --learn``/``--ship``): for each NFE

1. ``python -m optimize ld3 base=unipc`` (and ``base=dpmpp_2m``), LD3's defaults; the LD3 table with the lower
   validation L2 of its own fit is the start of the chain (``best_ld3``);
2. ``python -m optimize iia base=table:<LD3 table>``;
3. ``python -m optimize ddss family=full init=table:<LD3 table> loss=kid+match`` (``ddss_args``);
4. select: the candidate with the lowest training-set FD (first feature net) on the selection seeds
   ``VAL_SEED_OFFSET..`` (``selection_scores``), never the evaluation seeds, the held-out set or the second feature
   net, so every reported figure is independent of the choice;
5. ship: ``checkpoints/tables/<model>-best-nfe<N>.safetensors`` with the selection scores in its metadata.

Each step runs the command-line tool in its own process, as a user would, and copies the table into a tables folder;
a table already there is kept (a rerun fits only what is missing).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from samplers import SolverTable

from optimize.base import REPO, TABLE_PREFIX, repo_relative
from optimize.base.paths import slug
from optimize.evaluation.evaluate import Judge, draw, evaluate
from optimize.evaluation.metrics import ReferenceCache
from optimize.base.seeds import VAL_SEED_OFFSET, seed_range

LD3_BASES = ["unipc", "dpmpp_2m"]  # the base solvers LD3 learns over; the chain starts from the better one
SHIPPED = REPO / "checkpoints" / "tables"  # where ``ship`` puts <model>-best-nfe<N>.safetensors
BENCH = REPO / "docs" / "results" / "bench"  # where ``write_bench_results`` puts the benchmarks' rows


# --- the recipe: LD3 -> IIA -> DDSS through the command line ---------------------------------------
def run_cli(args: list[str], run: Path) -> float:
    """``python -m optimize <args>`` in its own process (output in ``run``); returns its wall seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "optimize", *args, f"hydra.run.dir={run}"], cwd=REPO, check=True)
    return time.perf_counter() - t0


def _run_dir(model: str, name: str, runs: Path | None = None) -> Path:
    return (REPO / "outputs" / "results-learned" / model if runs is None else runs) / name


def fit_ld3(model: str, nfe: int, base: str, tables: Path, extra: tuple[str, ...] = (), runs: Path | None = None) -> Path:
    """``tables/ld3-<base>-nfe<N>.safetensors`` (and its sigma plot), fitted with LD3's defaults unless already there
    (``extra``: more ``key=value`` settings such as the model's overrides; ``runs``: where the run folders go)."""
    dest = tables / f"ld3-{base}-nfe{nfe}.safetensors"
    if not dest.exists():
        run = _run_dir(model, f"ld3-{base}-nfe{nfe}", runs)
        run_cli(["ld3", f"model={model}", f"nfe={nfe}", f"base={base}", "evaluate=false", *extra], run)
        shutil.copyfile(run / f"ld3-{base}-{model}-nfe{nfe}.safetensors", dest)
        shutil.copyfile(run / f"ld3-{base}-{model}-nfe{nfe}-sigmas.png", tables / f"ld3-{base}-nfe{nfe}-sigmas.png")
    return dest


def best_ld3(paths: list[Path]) -> Path:
    """The LD3 table with the lowest validation L2 of its own fit (LD3's selection, not the evaluation seeds)."""
    return min(paths, key=lambda p: SolverTable.load(str(p)).metadata["ld3"]["best_valid_l2"])


def fit_oss(model: str, nfes: Sequence[int], tables: Path, extra: tuple[str, ...] = (), runs: Path | None = None) -> dict[int, Path]:
    """``tables/oss-nfe<N>.safetensors`` for every N in ``nfes``: OSS's search with its defaults (an Euler schedule
    nearest a 200-step teacher on the fit seeds), for the missing ones only and as ONE search of max(N) rounds (its
    round K gives the K-step schedule, the same as a search for K alone): the chain's start where LD3 is weak (the
    text-to-image teachers)."""
    dest = {nfe: tables / f"oss-nfe{nfe}.safetensors" for nfe in nfes}
    missing = sorted(nfe for nfe, path in dest.items() if not path.exists())
    if missing:
        tag = "-".join(str(n) for n in missing)
        run = _run_dir(model, f"oss-nfe{tag}", runs)
        run_cli(["oss", f"model={model}", f"nfe=[{','.join(str(n) for n in missing)}]", "evaluate=false", *extra], run)
        for nfe in missing:
            shutil.copyfile(run / f"oss-{model}-nfe{nfe}.safetensors", dest[nfe])
    return dest


def fit_iia(model: str, nfe: int, ld3: Path, tables: Path, extra: tuple[str, ...] = (), runs: Path | None = None,
            tag: str | None = None) -> Path:
    """``tables/iia-<start>-nfe<N>.safetensors``: IIA's defaults over the start table ``ld3`` (LD3's or OSS's, named
    by its ``method``, or ``tag`` when given), unless already there."""
    method = str(SolverTable.load(str(ld3)).metadata["method"])  # ld3-unipc, oss, ...
    start = tag or method.split("-")[0]
    dest = tables / f"iia-{start}-nfe{nfe}.safetensors"
    if not dest.exists():
        run = _run_dir(model, f"iia-{start}-nfe{nfe}", runs)
        run_cli(["iia", f"model={model}", f"nfe={nfe}", f"base=table:{ld3}", "evaluate=false", *extra], run)
        shutil.copyfile(run / f"iia-generic-{method}-{model}-nfe{nfe}.safetensors", dest)
    return dest


def ddss_args(model: str, nfe: int, ld3: Path, steps: int, extra: tuple[str, ...] = (), loss: str = "kid+match") -> list[str]:
    """The DDSS command of the chain: every causal coefficient and the sigmas from the LD3 table, KID + teacher L2
    (``loss=match``: the teacher L2 alone, selected by it: no data needed; ``extra``: more ``key=value`` settings,
    e.g. a CPU budget's batch size)."""
    monitor = ["monitor=match"] if loss == "match" else []
    return ["ddss", f"model={model}", f"nfe={nfe}", "family=full", f"init=table:{ld3}", f"loss={loss}", *monitor,
            f"steps={steps}", "val_every=50", "max_minutes=null", "evaluate_at_end=false", "progress_bar=false", *extra]


def fit_ddss(model: str, nfe: int, ld3: Path, tables: Path, steps: int, extra: tuple[str, ...] = (),
             runs: Path | None = None, loss: str = "kid+match", tag: str = "match") -> Path:
    """``tables/ddss-<tag>-nfe<N>.safetensors`` (and its plots): ``ddss_args`` from the LD3 table, unless already there."""
    stem = f"ddss-{tag}-nfe{nfe}"
    dest = tables / f"{stem}.safetensors"
    if not dest.exists():
        run = _run_dir(model, stem, runs)
        run_cli(ddss_args(model, nfe, ld3, steps, extra, loss), run)
        for suffix in (".safetensors", "-sigmas.png", "-coef.png"):
            shutil.copyfile(run / f"ddss-full-{loss.replace('+', '-')}-nfe{nfe}{suffix}", tables / f"{stem}{suffix}")
    return dest


def start_tag(entry: str) -> str:
    """A chain start (``ld3``, ``oss`` or ``SOLVER[:END]``) as a file-name component: ``euler:sigma_min`` ->
    ``euler-sigma_min``."""
    return slug(entry.replace(":", "-"))


def classic_start(m: Any, entry: str, table: SolverTable, tables: Path) -> Path:
    """``tables/<solver>[-<end>]-nfe<N>.safetensors``: the classic ``table`` of the start ``entry`` (``SOLVER`` or
    ``SOLVER:END``, built as a ``compare`` entry on the run's grid: the free start of a chain, no fit), stamped with
    the model ``m`` so ``init=table:`` and the selection take it."""
    dest = tables / f"{start_tag(entry)}-nfe{table.nfe}.safetensors"
    if not dest.exists():
        table.metadata.update({**m.table_metadata(), "fit_seconds": 0.0})
        table.save(str(dest))
    return dest


def fit_seconds(path: Path) -> float:
    """Wall seconds of a table's fit, including the LD3 (or OSS) fit a chained method started from."""
    meta = SolverTable.load(str(path)).metadata
    own = float(meta.get("fit_seconds") or meta.get("train_seconds") or 0.0)
    if path.name.startswith(("ld3-", "oss-")):
        return own
    start = Path(str(meta.get("init", "")).removeprefix(TABLE_PREFIX)) if meta.get("method") == "ddss" else None
    if start is None or not start.name:  # IIA over the chain's start (its metadata carries the start's own keys)
        first = "oss" if "oss" in meta else f"ld3-{meta.get('base_solver')}"
        start = path.parent / f"{first}-nfe{meta['nfe']}.safetensors"
    return own + (fit_seconds(path.parent / start.name) if (path.parent / start.name).exists() else 0.0)


# --- selection and shipping ------------------------------------------------------------------------
def selection_scores(judge: Judge, n_select: int, candidates: list[tuple[str, Any, SolverTable]], shape: Any,
                     dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """The selection rule of every results page: each ``(label, denoiser, table)``'s training-set FD (main features) on
    the selection seeds VAL_SEED_OFFSET.. (never the evaluation seeds); the lowest is picked."""
    seeds = seed_range(VAL_SEED_OFFSET, 0, n_select)
    main = next(iter(judge.features))
    sel = judge.restricted(splits=["train"], features=[main], n_boot=0)
    scores = {}
    for label, denoiser, t in candidates:
        scores[label] = float(evaluate(denoiser, t, judge=sel, shape=shape, seeds=seeds, dtype=dtype)[f"fd_train_{main}"])
        print(f"select {label}: FD train {main} on {n_select} selection seeds {scores[label]:.4g}", flush=True)
    return scores


def match_scores(m: Any, candidates: list[tuple[str, SolverTable]], seeds: list[int], target: torch.Tensor
                 ) -> dict[str, float]:
    """The selection rule without data (``select_by=match``): each table's mean squared distance to the teacher's solve
    ``target`` from the same noises on the selection seeds (with their cond: a text-to-image model's selection
    prompts); the lowest is picked."""
    scores = {}
    for label, t in candidates:
        x = draw(t, m.denoiser, m.shape, seeds, m.dtype, cond_of=m.cond_of)
        scores[label] = float((x - target.to(x)).double().pow(2).flatten(1).mean(1).mean())
        print(f"select {label}: teacher match on {len(seeds)} selection seeds {scores[label]:.4g}", flush=True)
    return scores


def select(m: Any, judge: Judge, nfe: int, n_select: int, candidates: list[tuple[str, Path]],
           target: torch.Tensor | None = None) -> tuple[str, Path, dict[str, float]]:
    """The candidate table of the model ``m`` at NFE ``nfe`` that ``selection_scores`` picks, or ``match_scores``
    against the teacher's solve ``target`` of the selection seeds when given."""
    tables = [(label, SolverTable.load(str(path), fingerprint=m.fingerprint)) for label, path in candidates]
    if target is not None:
        scores = match_scores(m, tables, seed_range(VAL_SEED_OFFSET, 0, n_select), target)
    else:
        scores = selection_scores(judge, n_select, [(label, m.denoiser, t) for label, t in tables], m.shape, m.dtype)
    label = min(scores, key=scores.get)
    return label, dict(candidates)[label], scores


def ship(m: Any, model: str, nfe: int, label: str, path: Path, scores: dict[str, float], data: str,
         folder: Path = SHIPPED, selection: str | None = None, start: Path | None = None,
         n_select: int | None = None) -> Path:
    """Copy the selected table to <folder>/<model>-best-nfe<N>.safetensors (default checkpoints/tables) with how it
    was chosen (``selection``; default: FD against the training ``data``) and what the chain started from (``start``:
    its method, fit seconds and settings, so the shipped file alone says what it cost)."""
    t = SolverTable.load(str(path), fingerprint=m.fingerprint)
    if n_select is not None:
        t.metadata["n_select"] = int(n_select)
    if start is not None:
        first = SolverTable.load(str(start)).metadata
        t.metadata["chain_start"] = {"method": first.get("method"), "fit_seconds": first.get("fit_seconds"),
                                     **{k: first[k] for k in ("oss", "ld3", "schedule", "end") if k in first}}
    how = selection or f"FD vs training {data}, main features, seeds {VAL_SEED_OFFSET}.."
    t.metadata.update({"model": model, "model_fingerprint": m.fingerprint, "shipped_as": f"{model}-best-nfe{nfe}",
                       "selected_from": scores, "selected": label, "selection": how, "source_table": repo_relative(path),
                       "chain_fit_seconds": round(fit_seconds(path), 1)})  # with the fit of the chain's start
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{model}-best-nfe{nfe}.safetensors"
    t.save(str(dest))
    return dest


# --- a sample cache keyed by table -----------------------------------------------------------------
def table_hash(table: SolverTable) -> str:
    """12 hex of SHA-256 over the table's sigmas and coefficients (what the generic executor samples from)."""
    h = hashlib.sha256(table.sigmas.detach().numpy().tobytes())
    h.update(table.coef.detach().numpy().tobytes())
    return h.hexdigest()[:12]


def cached_draw(model: Any, cache: ReferenceCache, name: str, table: SolverTable, seeds: list[int]) -> torch.Tensor:
    """Samples of ``table`` on ``seeds``, cached by model fingerprint, table hash and seeds; non-finite samples raise."""
    slug = name.replace("tada k=", "tada-k").replace(" ", "-")
    x = cache.get_or_compute(model.fingerprint, f"{slug}-{table_hash(table)}", table.nfe, seeds, model.shape, model.dtype,
                             lambda: draw(table, model.denoiser, model.shape, seeds, model.dtype))
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{name} at NFE {table.nfe} produced non-finite samples.")
    return x


# --- results pages -------------------------------------------------------------------------------
_STAMP = re.compile(r"^Generated by .*? on (\d{4}-\d{2}-\d{2})", re.M)


def page_date(page: Path) -> str:
    """The run date that a results page states (its ``Generated by `...` on YYYY-MM-DD`` line; today's when the page
    or the line is missing). A page rewritten from its committed CSVs keeps the date of the run that made the numbers,
    so it regenerates byte-identically."""
    found = _STAMP.search(page.read_text()) if page.is_file() else None
    return found.group(1) if found else date.today().isoformat()


# --- the benchmarks' output files ------------------------------------------------------------------
def write_bench_results(name: str, rows: list[dict], started: float, **extra: object) -> None:
    """Write rows to docs/results/bench/<name>.csv and the command line and machine to <name>.json beside it
    (``started``: the run's ``time.perf_counter()`` at its start; ``extra``: more fields of the json)."""
    BENCH.mkdir(parents=True, exist_ok=True)
    with open(BENCH / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    meta = {
        "command": "python " + shlex.join(["scripts/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                    "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        **extra,
    }
    (BENCH / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {BENCH / (name + '.csv')} and {name}.json")
