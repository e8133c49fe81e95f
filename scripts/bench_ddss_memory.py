"""Memory of one DDSS training step (sample N steps through the teacher + KID loss + backward), with and without
per-step rematerialisation (``samplers.sample(..., checkpoint=True)``), at N = 5, 10, 20.

    python scripts/bench_ddss_memory.py                    # digits teacher, batch 256
    python scripts/bench_ddss_memory.py --batch 64 --nfe 5 10 20 40

Two measures per configuration, each in a fresh subprocess:

- saved: bytes autograd keeps for backward, counted with ``torch.autograd.graph.saved_tensors_hooks`` (each
  distinct storage once). Inside a checkpointed step the checkpoint's own hook takes the step's tensors and
  drops them (they are recomputed in backward), so what remains is what really stays alive: the loss and
  feature net, the table's small tensors, and the inputs of each step.
- peak RSS: ``ru_maxrss`` of the process after the step minus before it (noisy: allocator caching, threads).

Prints one row per (N, remat) and the ratios N=20 : N=5 and no-remat : remat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from optimize.recipes import write_bench_results


def one(nfe: int, remat: bool, batch: int, family: str) -> dict:
    """Measure one training step in this process."""
    import torch

    from optimize.methods import ddss
    from optimize.cli import compose_config
    from optimize.evaluation.evaluate import Judge, load_model

    torch.set_num_threads(1)
    cfg = compose_config(["method=ddss", "model=edm", f"nfe={nfe}", f"family={family}"])
    model = load_model(cfg.model)
    judge = Judge.for_model(cfg.model, model.shape)
    module = ddss.build_module(cfg).attach(model, judge)
    noise = module.noise(batch, step=0)
    module.loss_of(module.generate(noise[:, :2], remat=remat)).backward()  # warm-up (lazy init, allocator)
    module.zero_grad()

    storages: dict[int, int] = {}
    total = [0]

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        total[0] += t.numel() * t.element_size()
        return t

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.loss_of(module.generate(noise, remat=remat))
    loss.backward()
    seconds = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"nfe": nfe, "remat": remat, "saved_bytes": sum(storages.values()), "saved_tensor_bytes": total[0],
            "peak_rss_kib": rss1, "rss_growth_kib": rss1 - rss0, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--family", default="ggdm")
    parser.add_argument("--one", nargs=2, metavar=("NFE", "REMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1] == "1", args.batch, args.family)))
        return
    started = time.perf_counter()
    rows = []
    for nfe in args.nfe:
        for remat in (True, False):
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, __file__, "--one", str(nfe), "1" if remat else "0", "--batch", str(args.batch),
                                  "--family", args.family], capture_output=True, text=True, env=env, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  measured nfe={nfe} remat={remat}", file=sys.stderr, flush=True)
    print(f"DDSS training step, {args.family}, batch {args.batch}, digits teacher (CPU, 1 thread)")
    head = f"{'N':>3}  {'remat':>5}  {'saved MiB':>10}  {'peak RSS MiB':>12}  {'RSS growth MiB':>14}  {'step s':>7}"
    print(head)
    for r in rows:
        print(f"{r['nfe']:>3}  {str(r['remat']):>5}  {r['saved_bytes'] / 2**20:>10.2f}  {r['peak_rss_kib'] / 1024:>12.1f}  "
              f"{r['rss_growth_kib'] / 1024:>14.1f}  {r['seconds']:>7.2f}")
    write_bench_results("ddss_memory", [
        {"family": args.family, "batch": args.batch, "nfe": r["nfe"], "remat": r["remat"],
         "saved_mib": f"{r['saved_bytes'] / 2**20:.3f}", "saved_bytes": r["saved_bytes"],
         "saved_tensor_bytes": r["saved_tensor_bytes"], "peak_rss_mib": f"{r['peak_rss_kib'] / 1024:.1f}",
         "rss_growth_mib": f"{r['rss_growth_kib'] / 1024:.1f}", "step_s": f"{r['seconds']:.3f}"} for r in rows],
        started, teacher="digits (model=edm), CPU, 1 thread per measurement subprocess")
    by = {(r["nfe"], r["remat"]): r for r in rows}
    lo, hi = min(args.nfe), max(args.nfe)
    for remat in (True, False):
        a, b = by[(lo, remat)], by[(hi, remat)]
        print(f"remat={remat}: saved bytes N={hi} / N={lo} = {b['saved_bytes'] / a['saved_bytes']:.2f}x, "
              f"RSS growth = {b['rss_growth_kib'] / max(a['rss_growth_kib'], 1):.2f}x")
    for nfe in args.nfe:
        a, b = by[(nfe, True)], by[(nfe, False)]
        print(f"N={nfe}: saved bytes without / with remat = {b['saved_bytes'] / a['saved_bytes']:.2f}x, "
              f"peak RSS without / with = {b['peak_rss_kib'] / a['peak_rss_kib']:.2f}x")


if __name__ == "__main__":
    main()
