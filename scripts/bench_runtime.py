"""Executor overhead benchmark (issue 3, item 7): in one process, interleaved, median of several runs.

(a) ``sample`` time / time of N bare denoiser calls, for a small MLP (2-D data) and a small conv net
    (nets' U-Net in EDMPrecond, 1x8x8), at batch 256 and several NFE;
(b) our table executor vs the diffusers scheduler loop (EDMEulerScheduler, EDMDPMSolverMultistepScheduler)
    on the same sigmas and the same EDM-preconditioned net; only the sampling loop is timed;
(c) the loop's own cost per step with a free denoiser (returns its input): what (a) and (b) add
    on top of the network, independent of its speed.

    python scripts/bench_runtime.py [--device cpu|cuda] [--repeats 7] [--nfe 10 50] [--batch 256] [--threads 1]

Every run's time is printed, then a table of medians and ratios (target: conv sample/bare <= 1.05,
ours/diffusers <= 1). The bare calls replay the inputs of a real solve. On a shared 2-core CPU one
conv call varies by +-20% between identical runs, so (a) also prints the ratio of the fastest runs
and the ratio derived from (c), which is precise to a few microseconds per step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from optimize.recipes import write_bench_results
from samplers import baselines, make_noise, nets, sample
from samplers.denoisers import EDMPrecond


def timer(device: torch.device, clock: str) -> Callable[[Callable[[], object]], float]:
    """Seconds fn() takes: wall time (synchronising the device around it), or this process's CPU
    time, which ignores time the shared machine gives to others (the CPU default: wall time here
    varies by +-20% between identical runs)."""
    now = time.process_time if clock == "cpu" else time.perf_counter

    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = now()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return now() - t0

    return run


def bare_calls(den: EDMPrecond, inputs: list[torch.Tensor], sigma_rows: torch.Tensor) -> Callable[[], object]:
    """N denoiser calls on the inputs a real solve feeds the net (recorded from a run): the floor for
    any sampler. Real inputs matter: a fixed 80-sigma input at every sigma is not the same work."""

    def fn() -> object:
        for x, s in zip(inputs, sigma_rows):
            den(x, s)

    return fn


def diffusers_loop(kind: str, net: Callable, sigmas: torch.Tensor, x0: torch.Tensor, order: int = 2) -> Callable[[], torch.Tensor]:
    """The standard diffusers loop (scale_model_input, net, step) with the scheduler's sigmas set to ours."""
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    def fn() -> torch.Tensor:
        if kind == "euler":
            sched = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
        else:
            sched = EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, solver_order=order)
        sched.set_timesteps(len(sigmas), device=x0.device)
        sched.sigmas = torch.cat([sigmas.float().cpu(), torch.zeros(1)])  # the same sigmas as the table
        sched.timesteps = sched.precondition_noise(sigmas.float()).to(x0.device)
        x = x0
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t)
            f = net(x_in, t.expand(x.shape[0]))
            x = sched.step(f, t, x).prev_sample
        return x

    return fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="process CPU time or wall time (default: cpu on a CPU device, wall on CUDA)")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {
        "mlp": (nets.build_net({"arch": "mlp"}), (2,)),
        "conv": (nets.build_net({"arch": "unet"}), (1, 8, 8)),
    }
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{clock} clock")
    for name, (net, shape) in models.items():
        print(f"{name}: {sum(p.numel() for p in net.parameters())} parameters, sample shape {list(shape)}")

    # every case is a zero-argument function; a row of the report divides two cases' medians
    cases: dict[tuple, Callable[[], object]] = {}
    checks: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for name, (net, shape) in models.items():
        net = net.to(device).eval()
        den = EDMPrecond(net, 0.5)
        for nfe in args.nfe:
            for solver in ("euler", "dpmpp_2m"):
                table = baselines.build(solver, nfe)
                noise = make_noise(table, shape, range(args.batch), device=device)
                sigmas = table.sigmas.to(device, torch.float32)
                rows = sigmas[:, None].expand(nfe, args.batch).contiguous()
                cases[(name, nfe, solver, "ours")] = lambda t=table, n=noise, d=den: sample(t, d, n)
                if solver == "euler":
                    inputs: list[torch.Tensor] = []
                    with torch.inference_mode():
                        sample(table, den, noise, callback=lambda i, x, d, s, keep=inputs: keep.append(x.clone()))
                    cases[(name, nfe, "-", "bare")] = bare_calls(den, inputs, rows)
                if not args.no_diffusers:
                    theirs = diffusers_loop(solver, net, table.sigmas, noise[0] * float(table.sigmas[0]))
                    cases[(name, nfe, solver, "diffusers")] = theirs
                    with torch.inference_mode():
                        checks.append((f"{name} nfe={nfe} {solver}", sample(table, den, noise), theirs()))

    free_nfe = max(args.nfe)
    for solver in ("euler", "dpmpp_2m"):  # (c): a denoiser that costs nothing exposes the loop itself
        table = baselines.build(solver, free_nfe)
        noise = make_noise(table, models["conv"][1], range(args.batch), device=device)
        cases[("free", free_nfe, solver, "ours")] = lambda t=table, n=noise: sample(t, lambda x, s: x, n)
        if not args.no_diffusers:
            free_net = lambda x, t: x  # noqa: E731
            cases[("free", free_nfe, solver, "diffusers")] = diffusers_loop(solver, free_net, table.sigmas, noise[0])

    for label, ours, theirs in checks:
        err = (ours - theirs).abs().max().item() / max(ours.abs().max().item(), 1e-12)
        print(f"check {label}: ours vs diffusers max relative difference {err:.2e}")

    times: dict[tuple, list[float]] = {key: [] for key in cases}
    run = timer(device, clock)
    keys = list(cases)
    groups: dict[tuple, list[tuple]] = {}
    for key in keys:  # cases compared with each other run back to back
        groups.setdefault(key[:2], []).append(key)
    with torch.inference_mode():
        for fn in cases.values():  # warm-up
            run(fn)
        for r in range(args.repeats):
            for group in groups.values():
                for key in group[r % len(group):] + group[: r % len(group)]:  # interleaved, rotated start
                    times[key].append(run(cases[key]))
            for name in [*models, "free"]:
                print(f"run {r} {name}: " + ", ".join(
                    f"{'/'.join(map(str, k[1:]))} {1e3 * times[k][-1]:.2f}ms" for k in keys if k[0] == name))

    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a: tuple, b: tuple) -> float:
        """Median over runs of a/b: the two ran back to back, so slow drifts of the machine cancel."""
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    csv_rows: list[dict] = []

    def row(table: str, model: str, nfe: int, solver: str, **vals: float) -> None:
        fields = ("bare_ms", "sample_ms", "ratio", "min_ratio", "derived_ratio", "ours_ms", "diffusers_ms",
                  "ours_us_per_step", "diffusers_us_per_step")
        csv_rows.append({"table": table, "model": model, "nfe": nfe, "solver": solver, "batch": args.batch,
                         "repeats": args.repeats, "clock": clock,
                         **{f: ("" if vals.get(f) is None else f"{vals[f]:.6g}") for f in fields}})

    loop = {solver: med[("free", free_nfe, solver, "ours")] / free_nfe for solver in ("euler", "dpmpp_2m")}
    print("\n(a) executor overhead: sample / N bare denoiser calls (medians of %d runs). 'ratio' is the median"
          " of per-run ratios, 'min ratio' the ratio of the fastest runs, 'derived' is 1 + (loop cost per step"
          " from (c)) / (bare call time): the direct ratios are only as good as the machine's noise" % args.repeats)
    print(f"{'model':6} {'nfe':>4} {'solver':9} {'bare ms':>9} {'sample ms':>10} {'ratio':>7} {'min ratio':>9} {'derived':>9}")
    for name in models:
        for nfe in args.nfe:
            bare_key = (name, nfe, "-", "bare")
            bare = med[bare_key]
            for solver in ("euler", "dpmpp_2m"):
                key = (name, nfe, solver, "ours")
                r, r_min = ratio(key, bare_key), min(times[key]) / min(times[bare_key])
                derived = 1 + loop[solver] * nfe / bare
                print(f"{name:6} {nfe:4d} {solver:9} {1e3 * bare:9.2f} {1e3 * med[key]:10.2f} {r:7.3f} {r_min:9.3f}"
                      f" {derived:9.5f}")
                row("a_overhead", name, nfe, solver, bare_ms=1e3 * bare, sample_ms=1e3 * med[key], ratio=r,
                    min_ratio=r_min, derived_ratio=derived)
    if not args.no_diffusers:
        print("\n(b) our table executor vs the diffusers scheduler loop, same sigmas and net")
        print(f"{'model':6} {'nfe':>4} {'solver':9} {'ours ms':>9} {'diffusers ms':>13} {'ratio':>7}")
        for name in models:
            for nfe in args.nfe:
                for solver in ("euler", "dpmpp_2m"):
                    ours, theirs = med[(name, nfe, solver, "ours")], med[(name, nfe, solver, "diffusers")]
                    r = ratio((name, nfe, solver, "ours"), (name, nfe, solver, "diffusers"))
                    print(f"{name:6} {nfe:4d} {solver:9} {1e3 * ours:9.2f} {1e3 * theirs:13.2f} {r:7.3f}")
                    row("b_vs_diffusers", name, nfe, solver, ours_ms=1e3 * ours, diffusers_ms=1e3 * theirs, ratio=r)
    print(f"\n(c) loop cost per step with a free denoiser (batch {args.batch}, 1x8x8, nfe {free_nfe})")
    for solver in ("euler", "dpmpp_2m"):
        ours = 1e6 * med[("free", free_nfe, solver, "ours")] / free_nfe
        line = f"{solver:9} ours {ours:8.1f} us/step"
        theirs = None
        if not args.no_diffusers:
            theirs = 1e6 * med[("free", free_nfe, solver, "diffusers")] / free_nfe
            line += f"   diffusers {theirs:8.1f} us/step"
        print(line)
        row("c_loop_cost", "free", free_nfe, solver, ours_us_per_step=ours, diffusers_us_per_step=theirs)
    params = {name: sum(p.numel() for p in net.parameters()) for name, (net, _) in models.items()}
    write_bench_results("runtime", csv_rows, started, device=str(device), clock=clock, parameters=params,
                  runs_ms={"/".join(map(str, k)): [round(1e3 * t, 3) for t in v] for k, v in times.items()})


if __name__ == "__main__":
    main()
