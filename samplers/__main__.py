"""``python -m samplers``: generate samples from a solver table, inspect table and network files.

    python -m samplers generate --solver dpmpp_2m --nfe 10 --model gmm --n 64 --out out/
    python -m samplers generate --table iia.safetensors --model edm:teacher.safetensors --out out/
    torchrun --nproc_per_node=4 -m samplers generate --solver heun --nfe 35 --model edm:PATH --num-samples 50000 --out out/
    python -m samplers info iia.safetensors

Seeds are ``seed .. seed+n-1`` and batch j is always ``seeds[j*bs:(j+1)*bs]``; under torchrun the batches
are dealt round-robin over ranks and gathered on rank 0, so the output does not depend on the world
size. Every user error is one ``error: ...`` line on stderr and exit status 2. (torchrun's own parser
rejects ``--n`` as an ambiguous abbreviation of its options, hence the ``--num-samples`` spelling.)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Any, NoReturn, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import __version__, baselines, denoisers, nets
from .artifact import atomic_write_bytes
from .images import write_png_grid
from .table import SolverTable, TableError, make_noise, sample

SHIPPED_TEACHER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "edm-digits.safetensors")


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
    src.add_argument("--schedule", default=None, help="karras | logsnr | time_uniform (default karras)")
    src.add_argument("--sigma-min", type=float, default=None, help="default 0.002, clamped to the model's range")
    src.add_argument("--sigma-max", type=float, default=None, help="default 80, clamped to the model's range")
    src.add_argument("--rho", type=float, default=None, help="karras rho (default 7)")
    src.add_argument("--eta", type=float, default=None, help="ddim stochasticity in [0, 1]")
    src.add_argument("--order", type=int, default=None, help="unipc order (1-3), ipndm max order (1-4) or tada Adams-Bashforth order (1-3)")
    src.add_argument("--detail", type=float, default=None, help="tada only: velocity prior variance k > 0 (default 1)")
    gen.add_argument("--model", default="gmm", help="gmm | gmm-ring | edm (the shipped digits teacher) | edm:PATH | diffusers:DIR (default gmm, 1x8x8)")
    gen.add_argument("--label", type=int, default=None, help="class label for class-conditional nets")
    gen.add_argument("--n", "--num-samples", dest="n", type=int, default=64,
                     help="number of samples (default 64); under torchrun spell it --num-samples (torchrun rejects --n)")
    gen.add_argument("--batch-size", type=int, default=256, help="samples per batch (default 256)")
    gen.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed + i (default 0)")
    gen.add_argument("--out", metavar="DIR", required=True, help="output folder: samples.npz (+ grid.png for images)")
    gen.add_argument("--device", default=None, help="default cuda if available, else cpu")
    gen.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    info = sub.add_parser("info", help="print a table (or network) file's metadata and shape")
    info.add_argument("file")
    return parser


# --- model and table ---------------------------------------------------------------------------
def load_model(spec: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, tuple[int, ...], str | None]:
    """``(denoiser, sample shape, fingerprint)`` for a ``--model`` spec.

    The fingerprint is taken before the weights are cast to ``dtype``, so a table fitted to a model
    is accepted whatever dtype it is later run in.
    """
    kind, _, arg = spec.partition(":")
    if spec == "edm":  # the shipped digits teacher
        kind, arg = "edm", str(SHIPPED_TEACHER)
    if spec in ("gmm", "gmm-ring"):
        gmm = denoisers.GaussianMixture.random() if spec == "gmm" else denoisers.GaussianMixture.ring()
        return gmm, tuple(gmm.shape), gmm.fingerprint()
    if kind == "edm" and arg:
        try:
            model = nets.load_denoiser(arg)
        except (nets.NetError, OSError) as err:
            raise UserError(str(err)) from None
        fingerprint = model.fingerprint()
        return model.to(device=device, dtype=dtype), tuple(model.shape), fingerprint
    if kind == "diffusers" and arg:
        try:
            model = denoisers.load_diffusers(arg, device=device)
        except (ValueError, OSError, ImportError) as err:
            raise UserError(str(err).strip().splitlines()[0]) from None
        fingerprint = model.fingerprint()
        size = model.model.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return model.to(dtype=dtype), (int(model.model.config.in_channels), *map(int, size)), fingerprint
    raise UserError(f"unknown model {spec!r}; valid: gmm, gmm-ring, edm, edm:PATH, diffusers:DIR.")


def check_label(model: Any, label: int | None) -> None:
    """``--label`` needs a class-conditional net and a label in its range."""
    if label is None:
        return
    config = getattr(model, "config", None)
    classes = config.get("num_classes", 0) if isinstance(config, dict) else 0
    unet_config = getattr(getattr(model, "model", None), "config", None)
    if unet_config is not None:  # diffusers UNet2DModel
        classes = getattr(unet_config, "num_class_embeds", None) or 0
    if classes <= 0:
        raise UserError(f"--label {label} needs a class-conditional model; this one is unconditional.")
    if not 0 <= label < classes:
        raise UserError(f"--label must be in 0..{classes - 1} for this model, got {label}.")


def make_table(args: argparse.Namespace, model: Any, fingerprint: str | None) -> SolverTable:
    """The table from ``--table`` (fingerprint-checked) or compiled from ``--solver``/``--nfe``."""
    if (args.table is None) == (args.solver is None):
        raise UserError("give either --table FILE or --solver NAME with --nfe N (exactly one of --table and --solver).")
    if args.table is not None:
        options = ("nfe", "schedule", "sigma_min", "sigma_max", "rho", "eta", "order", "detail")
        extras = [k for k in options if getattr(args, k) is not None]
        if extras:
            raise UserError(f"--table fixes the solver; drop --{extras[0].replace('_', '-')}.")
        try:
            return SolverTable.load(args.table, fingerprint=fingerprint)
        except TableError as err:
            raise UserError(str(err)) from None
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
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but no CUDA device is available.")
        if world > 1:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


# --- outputs -----------------------------------------------------------------------------------
def write_outputs(out: str, samples: np.ndarray, seeds: np.ndarray, metadata: dict) -> list[str]:
    """``out/samples.npz`` (samples, seeds, metadata JSON) and ``out/grid.png`` for [C, H, W] images."""
    os.makedirs(out, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, samples=samples, seeds=seeds, metadata=np.array(json.dumps(metadata, sort_keys=True)))
    written = [os.path.join(out, "samples.npz")]
    atomic_write_bytes(written[0], buf.getvalue())
    if samples.ndim == 4 and samples.shape[1] in (1, 3):
        written.append(write_png_grid(samples[:256], os.path.join(out, "grid.png")))
    return written


# --- commands ----------------------------------------------------------------------------------
def generate(args: argparse.Namespace, command: Sequence[str]) -> int:
    """Validate everything, then sample this rank's batches; rank 0 gathers and writes in seed order."""
    rank, world, local_rank = _world()
    if args.n < 1 or args.batch_size < 1:
        raise UserError(f"--n and --batch-size must be positive, got --n {args.n}, --batch-size {args.batch_size}.")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}.")
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    device = _device(args.device, world, local_rank)
    model, shape, fingerprint = load_model(args.model, device, dtype)
    check_label(model, args.label)
    table = make_table(args, model, fingerprint)
    cond_label = args.label

    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        seeds = list(range(args.seed, args.seed + args.n))
        bs = args.batch_size
        batches = [seeds[j : j + bs] for j in range(0, len(seeds), bs)]
        mine = list(range(rank, len(batches), world))
        results: list[tuple[int, np.ndarray]] = []
        bar = tqdm(mine, desc=f"{table.metadata.get('method', 'table')} nfe={table.nfe}", unit="batch",
                   disable=rank != 0 or args.no_progress, file=sys.stderr)
        with torch.inference_mode():
            for j in bar:
                noise = make_noise(table, shape, batches[j], dtype=dtype, device=device)
                cond = None if cond_label is None else torch.full((len(batches[j]),), cond_label, device=device)
                x = sample(table, model, noise, cond=cond)
                results.append((j, x.to("cpu", torch.float32).numpy()))
        if world > 1:
            gathered: list[Any] | None = [None] * world if rank == 0 else None
            dist.gather_object(results, gathered, dst=0)
            results = [r for part in (gathered or []) for r in part]
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
                "shape": list(shape),
                "dtype": args.dtype,
                "label": cond_label,
                "world_size": world,
                "command": " ".join(["python -m samplers", *command]),
                "package_version": __version__,
            }
            for path in write_outputs(args.out, samples, np.asarray(seeds, dtype=np.int64), metadata):
                print(path)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


def info(path: str) -> int:
    """Print a table file's metadata and shape summary (or a network file's config)."""
    from .artifact import read_header

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
              f"sample shape {list(nets.data_shape(config))}")
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return generate(args, argv) if args.command == "generate" else info(args.file)
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
