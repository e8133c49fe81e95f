"""What the text-to-image recipe's fit costs: measured here on 2 CPU cores, estimated for Stable Diffusion 1.5 on one GPU.

    python scripts/t2i_fit_cost.py [--teacher sd-tiny] [--extra T ...]   # -> docs/results/t2i/fit-cost-<teacher>.csv

For each shipped ``checkpoints/tables/<teacher>-best-nfe<N>.safetensors`` (``python -m optimize best start=oss
iia=false ddss_loss=match select_by=match ...``, or several starts, ``start=[oss,euler:sigma_min]``): the measured wall
seconds of its chain (OSS's search when the chain started from OSS, a classic start costing none, and the DDSS fit,
from the tables' metadata; a table picked among several starts' chains counts its own chain only), and the guided
denoiser evaluations (one evaluation = one sample at one noise level, both CFG branches) that chain needs, counted from the settings recorded in the tables (``--extra``: more tables of the same
recipe kept beside the shipped ones, e.g. a cheaper run's, or DDSS alone from a classic start, which has no OSS search
and no selection step):

- OSS: the teacher's Euler trajectory (n_search x teacher_steps) and, per step k of K = NFE, one evaluation at every
  grid point a state reached (n_search x (1 + (K - 1) x teacher_steps) at most);
- DDSS: the teacher pool (n_match x teacher_nfe), the validation targets (n_val x teacher_nfe), every training step
  (batch_size x NFE, x BACKWARD_FACTOR for the rematerialised backward pass) and every validation (n_val x NFE);
- selection: the teacher's solve and the table on n_select selection seeds.

The GPU column divides that count by ``SD15_EVALS_PER_S``, an ASSUMED throughput of Stable Diffusion 1.5's U-Net at
512x512 (64x64 latents) with classifier-free guidance in fp16 on one A100-class GPU, batched: an estimate, not a
measurement (no GPU was lent to this session).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from samplers import SolverTable

from optimize.base import REPO, TABLE_PREFIX

SD15_EVALS_PER_S = 50.0  # ASSUMED guided sample-steps per second, SD 1.5 at 512^2, fp16, one A100-class GPU, batched
BACKWARD_FACTOR = 3.0    # a training evaluation: forward, rematerialised forward and backward (about 2 forwards)


def chain_counts(meta: dict, oss: dict | None, nfe: int) -> dict[str, float]:
    """Guided denoiser evaluations of the chain behind one table (see the module docstring; ``oss`` None: DDSS alone)."""
    cfg = meta["run_config"]
    oss_evals = 0
    if oss is not None:
        n_search, steps_teacher = int(oss["n_search"]), int(oss["teacher_steps"])
        oss_evals = n_search * steps_teacher + n_search * (1 + (nfe - 1) * steps_teacher)
    steps, batch, n_val, val_every = int(cfg["steps"]), int(cfg["batch_size"]), int(cfg["n_val"]), int(cfg["val_every"])
    teacher = int(cfg["n_match"]) * int(cfg["teacher_nfe"]) + n_val * int(cfg["teacher_nfe"])
    train = steps * batch * nfe * BACKWARD_FACTOR
    val = (steps // max(val_every, 1) + 1) * n_val * nfe
    n_select = int(meta.get("n_select", 0))
    select = n_select * (int(cfg["teacher_nfe"]) + nfe)
    return {"oss_evals": oss_evals, "ddss_teacher_evals": teacher, "ddss_train_evals": train, "ddss_val_evals": val,
            "select_evals": select}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="sd-tiny")
    ap.add_argument("--extra", type=Path, nargs="*", default=[], help="more best tables of this teacher to cost")
    args = ap.parse_args()
    rows = []
    shipped = sorted((REPO / "checkpoints" / "tables").glob(f"{args.teacher}-best-nfe*.safetensors"),
                     key=lambda p: int(p.stem.rsplit("nfe", 1)[1]))
    missing = [str(p) for p in args.extra if not p.is_file()]
    if missing:
        ap.error(f"no table file {', '.join(missing)}")
    for path in shipped + [p.resolve() for p in args.extra]:
        t = SolverTable.load(str(path))
        meta = t.metadata
        start = meta.get("chain_start") or {}
        from_classic = meta.get("method") == "ddss" and not str(meta.get("init", TABLE_PREFIX)).startswith(TABLE_PREFIX)
        if not start.get("method") and not from_classic:
            raise SystemExit(f"error: {path.name} has no chain start (chain_start {start or 'missing'}) and is not DDSS "
                             "from a classic solver: not this recipe")
        counts = chain_counts(meta, start.get("oss") if start.get("method") == "oss" else None, t.nfe)
        total = sum(counts.values())
        if meta.get("model") != args.teacher:
            ap.error(f"{path.name} was learned for {meta.get('model')!r}, not {args.teacher!r}")
        rows.append({"teacher": args.teacher, "nfe": t.nfe, "table": str(path.relative_to(REPO)),
                     "selected": meta.get("selected") or "ddss alone",
                     "cpu_seconds_oss": start.get("fit_seconds", 0.0), "cpu_seconds_ddss": meta.get("train_seconds"),
                     "cpu_seconds_chain": meta.get("chain_fit_seconds", meta.get("train_seconds")), **counts,
                     "total_evals": total,
                     "assumed_sd15_evals_per_s": SD15_EVALS_PER_S,
                     "sd15_gpu_minutes_estimate": round(total / SD15_EVALS_PER_S / 60, 1)})
    if not rows:
        raise SystemExit(f"error: no checkpoints/tables/{args.teacher}-best-nfe*.safetensors to cost")
    out = REPO / "docs" / "results" / "t2i" / f"fit-cost-{args.teacher}.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
