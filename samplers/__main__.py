"""``python -m samplers``: generate samples from a solver table, inspect table and network files.

    python -m samplers generate --solver dpmpp_2m --nfe 10 --model gmm --n 64 --out out/
    python -m samplers generate --table iia.safetensors --model edm:teacher.safetensors --out out/
    python -m samplers generate --table t.safetensors --model diffusers:DIR --label 1 --guidance 3 --out out/
    python -m samplers generate --table t.safetensors --model diffusers:SD_DIR --prompts prompts.txt --guidance 7.5 --out out/
    torchrun --nproc_per_node=4 -m samplers generate --solver heun --nfe 35 --model edm:PATH --num-samples 50000 --out out/
    python -m samplers info iia.safetensors
    python -m samplers export ld3.safetensors --to diffusers --model diffusers:DIR --out schedule.json

Seeds are ``seed .. seed+n-1`` and batch j is always ``seeds[j*bs:(j+1)*bs]``; under torchrun the batches
are dealt round-robin over ranks and gathered on rank 0, so the output does not depend on the world
size. Every user error is one ``error: ...`` line on stderr and exit status 2, found before any sampling
where it can be. (torchrun's own parser rejects ``--n`` as an ambiguous abbreviation of its options, hence
the ``--num-samples`` spelling.)

Faults: each finished batch is written at once as an atomic shard in ``.<out>.partial/`` beside ``--out``, named
with its SHA-256 so that ``--resume`` samples a damaged shard again instead of merging it; a full disk stops the run
with one error line that says which batches were kept;
rerunning the same command with ``--resume`` samples only the missing batches, and the final output is
byte-identical to an uninterrupted run. The output folder (samples.npz + grid.png) appears as one unit
(temporary folder + rename); a folder that already holds results is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import zipfile
from typing import Any, NoReturn, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import __version__, baselines, export, models, nets, t2i
from .artifact import atomic_write_bytes, read_header
from .images import encode_png, to_uint8, write_png_grid
from .table import SolverTable, TableError, first_nonfinite, make_noise, sample, sigma_limit


class UserError(Exception):
    """A bad command line or input file; printed as one ``error:`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are a single ``error: ...`` line (exit 2) instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see {self.prog} --help).\n")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m samplers", description="Run learned diffusion samplers (solver tables).")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    gen = sub.add_parser("generate", help="generate samples with a table file or a classic solver")
    src = gen.add_argument_group("sampler (give --table, or --solver with --nfe)")
    src.add_argument("--table", metavar="FILE", help="solver table file (.safetensors)")
    src.add_argument("--solver", metavar="NAME", help=f"classic solver: {', '.join(baselines.SOLVERS)}")
    src.add_argument("--nfe", type=int, help="number of denoiser evaluations (exact)")
    src.add_argument("--schedule", default=None, help="karras | logsnr | time_uniform | flow (default karras)")
    src.add_argument("--sigma-min", type=float, default=None, help="default 0.002, clamped to the model's range")
    src.add_argument("--sigma-max", type=float, default=None, help="default 80, clamped to the model's range")
    src.add_argument("--rho", type=float, default=None, help="karras rho (default 7)")
    src.add_argument("--eta", type=float, default=None, help="ddim stochasticity in [0, 1]")
    src.add_argument("--order", type=int, default=None, help="unipc order (1-3), ipndm max order (1-4) or tada Adams-Bashforth order (1-3)")
    src.add_argument("--detail", type=float, default=None, help="tada only: velocity prior variance k > 0 (default 1)")
    mod = gen.add_argument_group("model (samplers.models.load: the spec optimize's model configs map onto)")
    mod.add_argument("--model", default="gmm", help=f"{models.SPECS} (default gmm, 1x8x8)")
    mod.add_argument("--model-kwargs", type=_json_object, default=None, metavar="JSON",
                     help='keyword arguments of a callable: target or of gmm / gmm-ring, e.g. \'{"std": 0.5}\'')
    mod.add_argument("--label", type=int, default=None, help="class-conditional nets: one class for every sample ...")
    mod.add_argument("--label-weights", type=_numbers, default=None, metavar="P0,P1,...",
                     help="... or a distribution over classes (assigned by position in each batch)")
    mod.add_argument("--guidance", type=float, default=None, metavar="W",
                     help="classifier-free guidance scale w: D_u + w (D_c - D_u) towards the label")
    mod.add_argument("--null-label", type=int, default=None, metavar="K",
                     help="the net's null (unconditional) class for --guidance (default: its last class)")
    mod.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                     help="text-to-image pipelines: a prompt (repeat for several; sample i gets prompt (seed+i) mod P)")
    mod.add_argument("--prompts", default=None, metavar="FILE", help="... or a text file with one prompt per line")
    mod.add_argument("--any-guidance", action="store_true",
                     help="run a table learned at another --guidance scale (checked against the model at that scale)")
    mod.add_argument("--negative-prompt", default=None, metavar="TEXT",
                     help="the unconditional side of --guidance for text-to-image pipelines (default \"\")")
    gen.add_argument("--n", "--num-samples", dest="n", type=int, default=64,
                     help="number of samples (default 64); under torchrun spell it --num-samples (torchrun rejects --n)")
    gen.add_argument("--batch-size", type=int, default=256, help="samples per batch (default 256)")
    gen.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed + i (default 0)")
    gen.add_argument("--out", metavar="DIR", required=True, help="output folder: samples.npz (+ grid.png for images)")
    gen.add_argument("--overwrite", action="store_true", help="replace the results already in --out (and any interrupted run's shards)")
    gen.add_argument("--resume", action="store_true", help="finish an interrupted run of the same command from its shards")
    gen.add_argument("--device", default=None, help="default cuda if available, else cpu")
    gen.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    info = sub.add_parser("info", help="print a table (or network) file's metadata and shape")
    info.add_argument("file")
    exp = sub.add_parser("export", help="a classic-solver table's sigma list for diffusers / ComfyUI (samplers/export.py)")
    exp.add_argument("table", metavar="TABLE", help="table file (.safetensors) that is a classic solver on its own sigmas")
    exp.add_argument("--to", required=True, choices=export.FORMATS, help="diffusers | comfyui | json")
    exp.add_argument("--model", default=None, metavar="diffusers:DIR",
                     help="the model whose noise schedule gives timesteps (needed for DPMSolver / Heun in diffusers)")
    exp.add_argument("--out", default=None, metavar="FILE", help="write the JSON there (atomically) instead of stdout")
    return parser


# --- model and table ---------------------------------------------------------------------------
def _numbers(text: str) -> list[float]:
    """``--label-weights 0.5,0.5``: comma-separated numbers (checked against the net by samplers.models)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers such as 0.5,0.5, got {text!r}") from None


def _json_object(text: str) -> dict[str, Any]:
    """``--model-kwargs '{"std": 0.5}'``: a JSON object."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"std\": 0.5}}', got {text[:80]!r}")
    return value


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> models.Loaded:
    """The ``--model`` spec with its label, guidance and keyword options, as ``python -m optimize`` loads the same
    model (``samplers.models.load``: the same checks, denoiser and fingerprint). The fingerprint is taken before the
    weights are cast to ``dtype``, so a table fitted to a model is accepted whatever dtype it is later run in."""
    if args.prompt is not None and args.prompts is not None:
        raise UserError("give --prompt (repeated) or --prompts FILE, not both.")
    try:
        return models.load(args.model, device=device, dtype=dtype, label=args.label, label_weights=args.label_weights,
                           guidance=args.guidance, null_label=args.null_label, kwargs=args.model_kwargs,
                           prompts=args.prompt if args.prompts is None else args.prompts,
                           negative_prompt=args.negative_prompt)
    except ValueError as err:
        raise UserError(" ".join(str(err).split())) from None


def make_table(args: argparse.Namespace, model: Any, fingerprint: str | None) -> SolverTable:
    """The table from ``--table`` (fingerprint-checked) or compiled from ``--solver``/``--nfe``, checked against the
    model (``SolverTable.check_for``: sigmas in its range, a one-step student's table size)."""
    table = _table_of(args, model, fingerprint)
    try:
        return table.check_for(model)
    except TableError as err:
        raise UserError(f"{args.table or f'--solver {args.solver}'}: {err}") from None


def _table_of(args: argparse.Namespace, model: Any, fingerprint: str | None) -> SolverTable:
    if (args.table is None) == (args.solver is None):
        raise UserError("give either --table FILE or --solver NAME with --nfe N (exactly one of --table and --solver).")
    if args.table is not None:
        options = ("nfe", "schedule", "sigma_min", "sigma_max", "rho", "eta", "order", "detail")
        extras = [k for k in options if getattr(args, k) is not None]
        if extras:
            raise UserError(f"--table fixes the solver; drop --{extras[0].replace('_', '-')}.")
        hint = ""
        if fingerprint is not None and isinstance(model, t2i.PromptDenoiser):
            try:
                fingerprint, hint = t2i.expected_fingerprint(SolverTable.load(args.table).metadata, model, fingerprint,
                                                             args.any_guidance)
            except TableError as err:
                raise UserError(str(err)) from None
        try:
            return SolverTable.load(args.table, fingerprint=fingerprint)
        except TableError as err:
            raise UserError(str(err) + hint) from None
    if args.nfe is None:
        raise UserError(f"--solver {args.solver} needs --nfe N.")
    lo, hi = getattr(model, "sigma_min", None), getattr(model, "sigma_max", None)
    sigma_min = args.sigma_min if args.sigma_min is not None else max(0.002, lo or 0.0)
    sigma_max = args.sigma_max if args.sigma_max is not None else min(80.0, hi or float("inf"))
    options: dict[str, Any] = {}
    if args.eta is not None:
        options["eta"] = args.eta
    if args.detail is not None:
        if args.solver in baselines.SOLVERS and args.solver != "tada":
            raise UserError(f"--detail is an option of --solver tada only; --solver {args.solver} does not take it.")
        options["detail"] = args.detail
    if args.order is not None:
        options["max_order" if args.solver == "ipndm" else "order"] = args.order
    try:
        return baselines.build(
            args.solver, args.nfe, sigma_min=sigma_min, sigma_max=sigma_max, schedule=args.schedule or "karras",
            rho=7.0 if args.rho is None else args.rho, **options
        )
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from None


# --- distributed -------------------------------------------------------------------------------
def _world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (1 process without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(name: str | None, world: int, local_rank: int) -> torch.device:
    """cpu, or a CUDA device that exists (under torchrun: this process's local rank)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name} cannot run samples; use cpu, cuda or cuda:N.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but no CUDA device is available.")
        if world > 1:
            device = torch.device("cuda", local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s).")
        torch.cuda.set_device(device)
    return device


# --- limits --------------------------------------------------------------------------------------
MAX_NFE = 10_000  # the table holds (N+1) x (K+2N) float64 coefficients and is planned in O(N^2) on the host
MAX_SEED = 2**63  # seeds are int64


def available_memory(device: torch.device) -> int:
    """Bytes free for new allocations: CUDA's free memory, or the host's MemAvailable (a large number if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_numbers(args: argparse.Namespace) -> None:
    """Counts, seeds and float options that no sampler can use, before anything is loaded."""
    if args.n < 1 or args.batch_size < 1:
        raise UserError(f"--n and --batch-size must be positive, got --n {args.n}, --batch-size {args.batch_size}.")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}.")
    if args.seed + args.n > MAX_SEED:
        raise UserError(f"seeds --seed .. --seed + --n - 1 must fit in 64 bits (below 2^63), got --seed {args.seed} and --n {args.n}.")
    for key in ("sigma_min", "sigma_max", "rho", "eta", "detail"):
        value = getattr(args, key)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{key.replace('_', '-')} must be a finite number, got {value}.")
    if args.nfe is not None and args.nfe > MAX_NFE:
        raise UserError(f"--nfe {args.nfe} is too large: at most {MAX_NFE} (the table alone would take "
                        f"{_gib(8.0 * (args.nfe + 1) * (2 * args.nfe + 1))}).")


def check_sigmas(args: argparse.Namespace, model: Any) -> None:
    """--sigma-min/--sigma-max inside the model's stated noise range (``samplers.table.sigma_limit``)."""
    limit = sigma_limit(model)
    for key in ("sigma_min", "sigma_max"):
        value = getattr(args, key)
        if value is not None and value > limit:
            raise UserError(f"--{key.replace('_', '-')} {value:g} is above the largest noise level this model supports ({limit:g}).")


def check_memory(n: int, batch: int, shape: Sequence[int], table: SolverTable, dtype: torch.dtype,
                 device: torch.device, out_parent: str, rank: int) -> None:
    """One batch (noise, live buffers, the model's activations) must fit the device, and on rank 0 all samples
    (held in memory, then written twice: shards and samples.npz) must fit the host and the disk."""
    per_sample = math.prod(int(d) for d in shape)
    item = torch.finfo(dtype).bits // 8
    batch_bytes = batch * per_sample * item * (table.n_noise + 32)  # buffers plus a generous allowance for activations
    free = available_memory(device)
    if batch_bytes > free:
        raise UserError(f"--batch-size {batch} needs about {_gib(batch_bytes)} on {device}, which has {_gib(free)} free; "
                        f"use a smaller --batch-size.")
    if rank != 0:
        return
    total = n * per_sample * 4  # float32 samples
    host = available_memory(torch.device("cpu"))
    if 2 * total > host:
        raise UserError(f"--n {n} samples take {_gib(total)} (twice that while writing); this machine has {_gib(host)} "
                        f"free; generate fewer at a time (--seed picks up where a run stopped).")
    disk = shutil.disk_usage(out_parent).free
    if 2 * total > disk:
        raise UserError(f"--n {n} samples need {_gib(2 * total)} of disk for shards and output, but {out_parent} has "
                        f"{_gib(disk)} free.")


# --- outputs -----------------------------------------------------------------------------------
RESULT_FILES = ("samples.npz", "grid.png", "images")  # images/: one PNG per sample of a text-to-image model


def partial_dir(out: str) -> str:
    """Where an unfinished run keeps its shards: ``.<name>.partial`` beside ``out``."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")


def check_out(args: argparse.Namespace) -> str:
    """``--out`` must be a folder we can create or fill: not empty, not a file, not below a file, writable, and
    holding no results unless --overwrite; shards of an interrupted run need --resume or --overwrite.
    Returns the existing parent folder (for the disk-space check)."""
    out = args.out
    if not out or not out.strip():
        raise UserError("--out must name a folder, got an empty string.")
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out {out} is a file; give a folder (it will hold samples.npz and grid.png).")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent != path and not os.path.isdir(parent):
        raise UserError(f"--out {out} is below the file {parent}; give a folder path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {parent} is not writable (permission denied).")
    if os.path.isdir(path):
        found = [f for f in os.listdir(path)]
        results = [f for f in found if f in RESULT_FILES]
        others = [f for f in found if f not in RESULT_FILES]
        if others:
            raise UserError(f"--out {out} holds other files ({', '.join(sorted(others)[:3])}); give a new or empty folder.")
        if results and not args.overwrite:
            raise UserError(f"--out {out} already holds results ({', '.join(sorted(results))}); add --overwrite to replace them.")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"--out {out} is not writable (permission denied).")
    if os.path.isdir(partial_dir(path)) and not (args.resume or args.overwrite):
        raise UserError(f"an interrupted run left its batches in {partial_dir(path)}; add --resume to finish it or "
                        f"--overwrite to start over.")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other (--overwrite starts over).")
    return parent


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz archive whose bytes depend only on the arrays (fixed zip timestamps), so reruns are byte-identical."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    return buf.getvalue()


def write_outputs(out: str, samples: np.ndarray, seeds: np.ndarray, metadata: dict, overwrite: bool = False,
                  pngs: bool = False) -> list[str]:
    """``out/samples.npz`` (samples, seeds, metadata JSON) and ``out/grid.png`` for [C, H, W] images (with ``pngs``
    also ``out/images/<seed>.png``, one per sample), written into a temporary sibling folder that is then renamed to
    ``out`` (an existing results folder is replaced only with ``overwrite``), so a reader never sees a mix of two
    runs."""
    final = os.path.abspath(out)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    try:
        data = npz_bytes({"samples": samples, "seeds": seeds, "metadata": np.array(json.dumps(metadata, sort_keys=True))})
        atomic_write_bytes(os.path.join(tmp, "samples.npz"), data)
        if samples.ndim == 4 and samples.shape[1] in (1, 3):
            write_png_grid(samples[:256], os.path.join(tmp, "grid.png"))
            if pngs:
                os.mkdir(os.path.join(tmp, "images"))
                for seed, image in zip(seeds, to_uint8(samples)):
                    atomic_write_bytes(os.path.join(tmp, "images", f"{int(seed):08d}.png"), encode_png(image))
        os.chmod(tmp, 0o777 & ~_umask())
        _replace_dir(tmp, final, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [os.path.join(out, f) for f in RESULT_FILES if os.path.exists(os.path.join(final, f))]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_dir(tmp: str, final: str, overwrite: bool) -> None:
    """Rename ``tmp`` to ``final``; an empty ``final`` is replaced, one with results only when ``overwrite``."""
    if os.path.isdir(final) and not os.listdir(final):
        os.rmdir(final)
    if not os.path.exists(final):
        try:
            os.rename(tmp, final)
            return
        except OSError:
            pass  # another run created it meanwhile
    if not overwrite or not os.path.isdir(final):
        raise UserError(f"--out {final} was filled by another run while this one sampled; nothing was written "
                        f"(add --overwrite to replace it).")
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=os.path.dirname(final))
    os.rename(final, os.path.join(old, "out"))
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# --- shards of an unfinished run -----------------------------------------------------------------
def run_identity(args: argparse.Namespace, table: SolverTable, fingerprint: str | None, shape: Sequence[int],
                 device: torch.device) -> dict[str, Any]:
    """Everything that decides the samples of a batch: a resumed run must match it exactly."""
    digest = hashlib.sha256(table.sigmas.numpy().tobytes() + table.coef.numpy().tobytes()).hexdigest()[:16]
    return {"table_sha256": digest, "model": args.model, "model_fingerprint": fingerprint, "n": args.n, "seed": args.seed,
            "batch_size": args.batch_size, "dtype": args.dtype, "label": args.label, "shape": list(shape),
            "device_type": device.type}


def open_partial(path: str, identity: dict[str, Any], resume: bool, overwrite: bool, rank: int) -> dict[int, str]:
    """The shards an interrupted run of the same command left (``{batch index: file}``, only with ``resume``);
    a run with other settings is an error naming the first differing key. ``overwrite`` clears them (rank 0)."""
    if not os.path.isdir(path):
        return {}
    if overwrite:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        return {}
    if not resume:
        return {}
    try:
        with open(os.path.join(path, "run.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"{path} has no readable run.json; add --overwrite to start over.") from None
    for key, value in identity.items():
        if not isinstance(saved, dict) or saved.get(key) != value:
            there = saved.get(key) if isinstance(saved, dict) else None
            raise UserError(f"--resume: the interrupted run in {path} had {key}={there!r}, this command has {key}={value!r}; "
                            f"rerun the same command, or add --overwrite to start over.")
    shards = {}
    for name in os.listdir(path):
        found = _SHARD_NAME.fullmatch(name)
        if found:
            shards[int(found.group(1))] = os.path.join(path, name)
    return shards


_SHARD_NAME = re.compile(r"batch-(\d{8})-([0-9a-f]{16})\.npy")  # batch index, then the first 16 hex of the file's SHA-256


def write_shard(path: str, identity: dict[str, Any], j: int, x: np.ndarray) -> None:
    """Batch ``j`` as ``batch-<j>-<sha256 of the file>.npy`` (atomic), with ``run.json`` written first."""
    meta = os.path.join(path, "run.json")
    if not os.path.exists(meta):
        os.makedirs(path, exist_ok=True)
        atomic_write_bytes(meta, json.dumps(identity, sort_keys=True).encode())
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    data = buf.getvalue()
    atomic_write_bytes(os.path.join(path, f"batch-{j:08d}-{hashlib.sha256(data).hexdigest()[:16]}.npy"), data)


def read_shard(file: str, expected: tuple[int, ...]) -> np.ndarray | None:
    """A shard's samples, or None when its bytes fail the checksum in its name, or it is unreadable or not the
    expected finite float32 shape (then that batch is sampled again, with a note)."""
    found = _SHARD_NAME.fullmatch(os.path.basename(file))
    try:
        with open(file, "rb") as f:
            data = f.read()
        ok = found is not None and hashlib.sha256(data).hexdigest()[:16] == found.group(2)
        x = np.load(io.BytesIO(data), allow_pickle=False) if ok else None
    except (OSError, ValueError):
        x = None
    if x is None or x.shape != expected or x.dtype != np.float32 or not np.all(np.isfinite(x)):
        sys.stderr.write(f"note: {file} fails its checksum or is not a batch of this run; sampling that batch again.\n")
        return None
    return x


# --- commands ----------------------------------------------------------------------------------
def generate(args: argparse.Namespace, command: Sequence[str]) -> int:
    """Validate everything, then sample this rank's missing batches (each written as a shard); rank 0 gathers,
    writes the output folder in seed order and removes the shards."""
    rank, world, local_rank = _world()
    check_numbers(args)
    out_parent = check_out(args)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    device = _device(args.device, world, local_rank)
    loaded = load_model(args, device, dtype)
    model, shape, out_shape, fingerprint = loaded.denoiser, loaded.shape, loaded.out_shape, loaded.fingerprint
    check_sigmas(args, model)
    table = make_table(args, model, fingerprint)
    check_memory(args.n, min(args.batch_size, args.n), max(shape, out_shape, key=math.prod), table, dtype, device,
                 out_parent, rank)
    identity = run_identity(args, table, fingerprint, shape, device)
    if loaded.prompts is not None:  # the prompts decide the samples too (the fingerprint holds guidance, not prompts)
        identity["prompts_sha256"] = hashlib.sha256(json.dumps(loaded.prompts).encode()).hexdigest()[:16]
    partial = partial_dir(args.out)
    shards = open_partial(partial, identity, args.resume, args.overwrite, rank)
    cond_label = args.label  # recorded; the denoiser applies the label (and guidance) itself

    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        seeds = list(range(args.seed, args.seed + args.n))
        bs = args.batch_size
        batches = [seeds[j : j + bs] for j in range(0, len(seeds), bs)]
        mine = list(range(rank, len(batches), world))
        results: list[tuple[int, np.ndarray]] = []
        failure: str | None = None
        todo = []
        for j in mine:
            done = read_shard(shards[j], (len(batches[j]), *out_shape)) if j in shards else None
            if done is None:
                todo.append(j)
            else:
                results.append((j, done))
        bar = tqdm(todo, desc=f"{table.metadata.get('method', 'table')} nfe={table.nfe}", unit="batch",
                   disable=rank != 0 or args.no_progress, file=sys.stderr)
        with torch.inference_mode():
            for j in bar:
                noise = make_noise(table, shape, batches[j], dtype=dtype, device=device)
                cond = None if loaded.cond_of is None else loaded.cond_of(batches[j]).to(device)
                x = sample(table, model, noise, cond)
                if loaded.decode is not None and bool(torch.isfinite(x).all()):
                    x = loaded.decode(x)  # latents to images
                if not bool(torch.isfinite(x).all()):  # one check per batch, after the loop
                    where, b = first_nonfinite(table, model, noise, cond)
                    failure = (f"samples became NaN or infinite at {where}, first for seed {batches[j][b]} (batch of seeds "
                               f"{batches[j][0]}..{batches[j][-1]}); "
                               f"the table, its sigma range or the network is unusable here (nothing of this batch was written).")
                    break
                result = x.to("cpu", torch.float32).numpy()
                try:
                    write_shard(partial, identity, j, result)
                except OSError as err:
                    failure = (f"writing batch {j} to {partial} failed ({err.strerror or err}); the {len(results)} finished "
                               f"batch(es) of this process are kept there: free space and rerun the same command with --resume")
                    break
                results.append((j, result))
        if world > 1:
            gathered: list[Any] | None = [None] * world if rank == 0 else None
            dist.gather_object((results, failure), gathered, dst=0)
            parts = gathered or []
            failure = next((f for _, f in parts if f), None) if rank == 0 else failure
            results = [r for part, _ in parts for r in part]
        if failure is not None:
            if rank == 0:
                raise UserError(failure)
            return 2
        if rank == 0:
            results.sort(key=lambda r: r[0])
            samples = np.concatenate([r[1] for r in results], axis=0)
            metadata = {
                "table": table.metadata,
                "table_file": args.table,
                "model": args.model,
                "model_fingerprint": fingerprint,
                "n": args.n,
                "seed": args.seed,
                "shape": list(out_shape),
                "dtype": args.dtype,
                "label": cond_label,
                **({"prompts": loaded.prompts, "guidance": args.guidance, "negative_prompt": args.negative_prompt}
                   if loaded.prompts is not None else {}),
                "world_size": world,
                "command": " ".join(["python -m samplers", *_command_of(command)]),
                "package_version": __version__,
            }
            try:
                written = write_outputs(args.out, samples, np.asarray(seeds, dtype=np.int64), metadata, args.overwrite,
                                        pngs=loaded.decode is not None)
            except OSError as err:
                raise UserError(f"writing {args.out} failed ({err.strerror or err}); nothing was written there and all "
                                f"{len(batches)} batches are kept in {partial}: free space and rerun the same command "
                                f"with --resume") from None
            for path in written:
                print(path)
            shutil.rmtree(partial, ignore_errors=True)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


_RUN_FLAGS = ("--resume", "--overwrite", "--no-progress")  # how a run was carried out, not what it computed


def _command_of(argv: Sequence[str]) -> list[str]:
    """The command line recorded in the output, without flags that do not change it (so a resumed run's output is
    byte-identical to an uninterrupted one)."""
    return [a for a in argv if a not in _RUN_FLAGS]


def info(path: str) -> int:
    """Print a table file's metadata and shape summary (or a network file's config)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file.")
    try:
        fmt = read_header(path).get("format")
    except TableError as err:
        raise UserError(str(err)) from None
    if fmt == nets.NET_FORMAT:
        try:
            net, config = nets.load_net(path)
        except nets.NetError as err:
            raise UserError(str(err)) from None
        print(f"{path}: network {config['arch']}, {sum(p.numel() for p in net.parameters())} parameters, "
              f"sample shape {list(nets.data_shape(config))}"
              + (f" -> {list(nets.output_shape(config))}" if nets.output_shape(config) != nets.data_shape(config) else ""))
        print(json.dumps(config, indent=2, sort_keys=True))
        return 0
    try:
        table = SolverTable.load(path)
    except TableError as err:
        raise UserError(str(err)) from None
    sig = table.sigmas.numpy()
    nonzero = int(table.support().sum())
    print(f"{path}: {table.metadata.get('method', '?')} table, nfe {table.nfe}, noise vectors {table.n_noise}, "
          f"coef {list(table.coef.shape)} ({nonzero} nonzero), sigmas {sig.max():.4g} .. {sig.min():.4g}")
    print(json.dumps(table.metadata, indent=2, sort_keys=True))
    return 0


def export_command(args: argparse.Namespace) -> int:
    """``export TABLE --to FORMAT``: the JSON of ``samplers.export`` on stdout or, atomically, in ``--out``."""
    out = os.path.abspath(args.out) if args.out is not None else None
    if out is not None and (not args.out.strip() or os.path.isdir(out)):
        raise UserError(f"--out must name a file, got {args.out!r}.")
    if out is not None and os.path.exists(out) and os.path.exists(args.table) and os.path.samefile(out, args.table):
        raise UserError(f"--out {args.out} is the table file itself; give another file.")
    try:
        table = SolverTable.load(args.table)
    except TableError as err:
        raise UserError(str(err)) from None
    try:
        abar = export.model_schedule(args.model) if args.model is not None else None
        text = export.render(export.export(table, args.to, abar))
    except ImportError:
        raise UserError("--model diffusers:DIR needs the diffusers package (pip install diffusers).") from None
    except ValueError as err:
        raise UserError(str(err) if str(err).startswith("--") else f"{args.table}: {err}") from None
    if out is None:
        sys.stdout.write(text)
        return 0
    try:
        atomic_write_bytes(out, text.encode())
    except OSError as err:
        raise UserError(f"writing --out {args.out} failed ({err.strerror or err}); nothing was written.") from None
    print(args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "export":
            return export_command(args)
        return generate(args, argv) if args.command == "generate" else info(args.file)
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
