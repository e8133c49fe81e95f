"""Wall time of fitting a 10-NFE IIA table on the shipped digits teacher (CPU by default).

    python scripts/bench_iia_fit.py [--nfe 10] [--n-fit 512] [--threads 2] [--device cpu]

Prints, per configuration, the fit time (wall and process CPU time: on a shared machine the CPU time is the
steadier figure), the denoiser evaluations it spent (per sample) and the time of one 10-NFE sampling pass at
the same batch, so the ratio says how many sampling passes a fit costs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from optimize.methods import iia
from optimize.recipes import write_bench_results
from samplers import baselines, make_noise, sample
from samplers.nets import load_denoiser

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {  # label: (base, variant, target, substeps, fine solver)
    "paper IIA-DPM-Solver++ (step target, 4 sub-steps)": ("dpmpp_2m", "dpmpp", "step", 4, None),
    "paper IIA-DDIM (step target, 4 sub-steps)": ("euler", "ddim", "step", 4, None),
    "default (generic, trajectory, Heun x8)": ("euler", "generic", "trajectory", 8, "heun"),
}


class Counter(torch.nn.Module):
    """Counts the samples that pass through the denoiser."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, *cond: object) -> torch.Tensor:
        self.calls += x.shape[0]
        return self.inner(x, sigma, *cond)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--n-fit", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    den = Counter(load_denoiser(str(REPO / "checkpoints" / "edm-digits.safetensors"), device=args.device))
    shape = (1, 8, 8)
    with torch.no_grad():
        noise = make_noise(1, shape, range(args.n_fit), device=args.device)
        sample(baselines.build("euler", 2), den, noise)  # warm-up: the first call pays one-off setup
        t0 = time.perf_counter()
        sample(baselines.build("euler", args.nfe), den, noise)
        one_pass = time.perf_counter() - t0
    print(f"digits teacher, NFE {args.nfe}, n_fit {args.n_fit}, {args.threads} thread(s), {args.device}: "
          f"one sampling pass {one_pass:.2f} s")
    print(f"{'configuration':52s} {'fit s':>7s} {'cpu s':>7s} {'evals/sample':>13s} {'fit / pass':>11s}")
    rows = []
    for label, (base, variant, target, substeps, fine) in CONFIGS.items():
        den.calls = 0
        t0, c0 = time.perf_counter(), time.process_time()
        iia.fit(den, baselines.build(base, args.nfe), shape, n_fit=args.n_fit, substeps=substeps, variant=variant,
                target=target, fine_solver=fine, device=args.device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"{label:52s} {seconds:7.2f} {cpu:7.2f} {den.calls / args.n_fit:13.0f} {seconds / one_pass:11.1f}")
        rows.append({"configuration": label, "base": base, "variant": variant, "target": target, "substeps": substeps,
                     "fine_solver": fine or "", "nfe": args.nfe, "n_fit": args.n_fit, "threads": args.threads,
                     "device": args.device, "fit_wall_s": f"{seconds:.3f}", "fit_cpu_s": f"{cpu:.3f}",
                     "evals_per_sample": f"{den.calls / args.n_fit:.1f}", "one_pass_wall_s": f"{one_pass:.3f}",
                     "fit_over_pass": f"{seconds / one_pass:.2f}"})
    write_bench_results("iia_fit", rows, started, teacher="checkpoints/edm-digits.safetensors")


if __name__ == "__main__":
    main()
