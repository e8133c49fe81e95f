"""LD3: learn the time steps of a classic solver by matching the teacher's own samples from the same noise
(Tong et al., "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025; public code vinhsuhi/LD3).

The learned-peer baseline. What is learned (LD3's ``discretize_model_wrapper``, lambda mode, lambda = -log sigma):

    lambda_j = lambda(sigma_max) + (lambda(sigma_min) - lambda(sigma_max)) * cumsum(softmax(xi))_j (normalised)   j = 0..N
    lambda'_j = lambda_j + clamp(eta_j, +-w * min_j |lambda_{j+1} - lambda_j|),   eta_0 = eta_N = 0

``xi`` (N+1 logits, initialised to ones: uniform in log-SNR) place the N+1 step sigmas from sigma_max down to
sigma_min; the solver's coefficients are those of its steps (``lambda_j``) while the denoiser of step j is told the
decoupled level ``sigma'_j = exp(-lambda'_j)`` (LD3's second time grid, ``w`` = ``window`` = 0.5). The last step lands
on sigma_min, which is never evaluated (``baselines.build(..., end="sigma_min")``): N steps, N evaluations.

Loss: per-sample mean squared error to a fine teacher solve from the same noise (LD3's ``L2``; LPIPS needs >= 32 px RGB
and a VGG download, so the 8x8 digits use L2 as the paper does for small data). Soft teacher: every training and
validation noise ``e`` is itself a variable that may move inside the ball ``|e - e_orig| <= r`` with
``r = 0.001 d / N^2`` (d = sample dimension; LD3's ``adjust_hyper``); a move is kept only when it lowers that sample's
loss. Optimisers and schedule are LD3's: RMSprop(lr 0.005, momentum 0.9) on ``xi``, SGD(lr 0.1/N) on ``eta`` (frozen in
the first ``rounds_v1`` rounds), SGD(lr 12/N) on the noises, gradient-norm clip 1, batch 2; validation after every
step on the validation noises, the best parameters kept; after ``patience`` worse validations the best is reloaded and
the learning rates decay x0.8 (the first time only switches to the full validation set in LD3: ours always is).

Deviation from the public code, on purpose: its lambda mode bounds ``eta`` by ``w`` times the smallest gap between
consecutive *logits* ``xi`` (0 at the uniform initialisation, and in logit units); we bound it by ``w`` times the
smallest gap between consecutive ``lambda_j``, the paper's window (its time mode does the same in time units).

The coefficients of the base solver are a function of the step sigmas computed by ``baselines.build`` (numpy, float64);
their derivative is its central difference in log sigma (``_compile``), so the runtime's one set of compilers serves
both sampling and learning. Sampling runs through ``samplers.sample``.

Text-to-image models: the noise of seed s is solved (teacher and fit) with the model's cond of s (its prompt,
``Model.cond_of``), which follows that noise through the train/valid split, the shuffled batches and the soft-teacher
moves (``optimize.base.conds``); models without a cond are unchanged.

No resume: a fit is a pure function of its settings (seeded noises, fixed data order, no wall-clock limit), so a
killed run is rerun with the same command and gives a bit-identical table (tests/test_ld3.py). A model that leaves the
finite numbers (teacher solve or fit) stops the run with one sentence naming the evaluation and its sigma.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from samplers import SolverTable, baselines, make_noise, sample
from samplers.table import first_nonfinite

from optimize.base import ConfigError, as_list
from optimize.evaluation.evaluate import Judge, evaluate_jobs, load_model
from optimize.evaluation.evaluate import validate as validate_evaluate
from optimize.base.keys import Key, count
from optimize.evaluation.results import plot_sigmas
from optimize.base.conds import cond_of_seeds, cond_rows
from optimize.training.distill import check_teacher, teacher_native, teacher_targets
from optimize.training.runs import NaNLossError, compare_tables
from optimize.base.seeds import FIT_SEED_OFFSET, seed_range

KEYS = {  # this method's typed keys (optimize.base.keys; shared ones are declared there)
    "n_train": count(10**6), "n_valid": count(10**6), "rounds_v1": count(1000), "rounds_v2": count(1000, low=0),
    "ld3_batch_size": count(10**6), "patience": count(10**6), "window": Key("num", 0, 0.999)}
BASES = ("unipc", "dpmpp_2m", "dpmpp_3m", "ipndm", "euler")  # one evaluation per step
FD_STEP = 1e-6  # central-difference step in log sigma for the coefficient Jacobian


# --- the learned discretisation ------------------------------------------------------------------
class LD3Steps(nn.Module):
    """LD3's two time grids: ``logits`` (N+1) for the step sigmas and ``offsets`` (N+1) for the decoupled evaluation
    sigmas, inside [sigma_min, sigma_max] (both ends fixed)."""

    def __init__(self, nfe: int, sigma_min: float = 0.002, sigma_max: float = 80.0, window: float = 0.5):
        super().__init__()
        if int(nfe) < 1:
            raise ValueError(f"ld3 needs nfe >= 1, got {nfe}.")
        self.nfe, self.window = int(nfe), float(window)
        self.lam_lo, self.lam_hi = -math.log(sigma_max), -math.log(sigma_min)
        self.logits = nn.Parameter(torch.ones(self.nfe + 1, dtype=torch.float64))
        self.offsets = nn.Parameter(torch.zeros(self.nfe + 1, dtype=torch.float64))

    def lambdas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(step lambdas [N+1] from lambda(sigma_max) to lambda(sigma_min), evaluation lambdas [N+1])."""
        c = torch.cumsum(torch.softmax(self.logits, dim=0), dim=0)
        normed = (c - c[0]) / (c[-1] - c[0])
        lam = self.lam_lo + normed * (self.lam_hi - self.lam_lo)
        max_move = self.window * float((lam[1:] - lam[:-1]).detach().abs().min())
        mask = torch.ones_like(lam)
        mask[0] = mask[-1] = 0.0
        return lam, lam + self.offsets.clamp(-max_move, max_move) * mask

    def sigmas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(step sigmas [N+1] ending at sigma_min, evaluation sigmas [N])."""
        lam, lam_eval = self.lambdas()
        return torch.exp(-lam), torch.exp(-lam_eval[:-1])


def _compile(base: str, options: dict[str, Any], step_sigmas: torch.Tensor, eval_sigmas: torch.Tensor,
             metadata: dict[str, Any] | None = None) -> SolverTable:
    """The base solver's table on ``step_sigmas`` (end=sigma_min) evaluated at ``eval_sigmas``; with grad, its coef is
    ``C(s) + sum_j dC/dlog s_j (log s_j - stop_grad(log s_j))``: the value of C, the gradient of C (central differences)."""
    n = eval_sigmas.shape[0]
    s = step_sigmas.detach().cpu().numpy().astype(np.float64)
    table = baselines.build(base, n, sigmas=s, end="sigma_min", **options)
    coef = table.coef
    meta = {**table.metadata, **(metadata or {})}
    if step_sigmas.requires_grad:
        logs = step_sigmas.log()
        for j in range(1, n):  # the ends are fixed
            hi, lo = s.copy(), s.copy()
            hi[j], lo[j] = s[j] * math.exp(FD_STEP), s[j] * math.exp(-FD_STEP)
            jac = (baselines.build(base, n, sigmas=hi, end="sigma_min", **options).coef
                   - baselines.build(base, n, sigmas=lo, end="sigma_min", **options).coef) / (2 * FD_STEP)
            coef = coef + jac * (logs[j] - logs[j].detach())
    sig = eval_sigmas if eval_sigmas.requires_grad else eval_sigmas.detach().cpu()
    return SolverTable(sig, coef, meta, check=not (step_sigmas.requires_grad or eval_sigmas.requires_grad))


def l2_per_sample(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LD3's L2: mean over pixels of the squared difference, one value per sample."""
    return (x - y).pow(2).flatten(1).mean(1)


def soft_teacher_bound(shape: Sequence[int], nfe: int) -> float:
    """LD3's ball radius for the noises: ``0.001 * d / N^2`` (d = number of sample dimensions)."""
    return 0.001 * float(np.prod(shape)) / nfe**2


class LD3Fitter:
    """One LD3 fit: the parameters, the (soft) noises and teacher targets, LD3's rounds, patience and decays.

    ``train`` and ``valid`` are ``(noises, targets)`` or ``(noises, targets, cond)`` with a per-row cond (row i of the
    noises has cond row i: a text-to-image sample's prompt index, ``Model.cond_of``), which follows its noise through
    every batch and move; ``cond`` is one cond for every row of a split that has none (None: the model takes none)."""

    def __init__(self, denoiser: Any, base: str, nfe: int, *, train: tuple[torch.Tensor, torch.Tensor],
                 valid: tuple[torch.Tensor, torch.Tensor], sigma_min: float, sigma_max: float, window: float = 0.5,
                 lr_time_1: float = 0.005, lr_time_2: float | None = None, shift_lr: float | None = None,
                 prior_bound: float | None = None, batch_size: int = 2, patience: int = 5, lr2_patience: int = 5,
                 lr_decay: float = 0.8, min_lr_time_1: float = 5e-5, min_lr_time_2: float = 1e-6, seed: int = 0,
                 options: dict[str, Any] | None = None, cond: Any = None):
        if base not in BASES:
            raise ValueError(f"ld3 base must be one of {', '.join(BASES)}, got {base!r}.")
        self.denoiser, self.base, self.nfe, self.cond = denoiser, base, int(nfe), cond
        self.options = dict(options or {})
        self.steps = LD3Steps(nfe, sigma_min, sigma_max, window)
        self.sigma_max = float(sigma_max)
        shape = train[0].shape[1:]
        self.bound = soft_teacher_bound(shape, self.nfe) if prior_bound is None else float(prior_bound)
        self.shift_lr = 3.0 * 4 / self.nfe if shift_lr is None else float(shift_lr)
        self.opt1 = torch.optim.RMSprop([self.steps.logits], lr=lr_time_1, momentum=0.9)
        self.opt2 = torch.optim.SGD([self.steps.offsets], lr=(0.1 / self.nfe) if lr_time_2 is None else lr_time_2)
        self.min_lr1, self.min_lr2, self.lr_decay = min_lr_time_1, min_lr_time_2, lr_decay
        self.batch_size, self.patience, self.lr2_patience = int(batch_size), int(patience), int(lr2_patience)
        # (original noise, current noise, target) per split; noises are unit normal, x_0 = sigma_max e
        self.data = {name: {"orig": split[0].clone(), "cur": split[0].clone(), "target": split[1],
                            "cond": split[2] if len(split) > 2 else None} for name, split in
                     (("train", train), ("valid", valid))}
        self.gen = torch.Generator().manual_seed(int(seed))
        self.best_loss, self.count_worse, self.min_lr2_hits, self.iterations = math.inf, 0, 0, 0
        self.best_state = self._state()
        self.history: list[dict[str, float]] = []

    # sampling ------------------------------------------------------------------------------------
    def table(self, grad: bool = False, metadata: dict[str, Any] | None = None) -> SolverTable:
        with torch.set_grad_enabled(grad):
            step, ev = self.steps.sigmas()
            if not grad:
                step, ev = step.detach(), ev.detach()
            return _compile(self.base, self.options, step, ev, metadata)

    def losses(self, table: SolverTable, e: torch.Tensor, target: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Per-sample L2 of ``table``'s samples from ``e`` (with the per-row ``cond``, else the fitter's) to
        ``target``; NaNLossError where a sample is not finite."""
        noise = e.to(target.dtype)[None]
        cond = self.cond if cond is None else cond
        x = sample(table, self.denoiser, noise, cond)
        if not torch.isfinite(x).all():
            with torch.no_grad():
                where, i = first_nonfinite(table, self.denoiser, noise.detach(), cond)
            raise NaNLossError(f"ld3 stopped at iteration {self.iterations}: the {self.base} table gave NaN or infinite "
                               f"samples at {where}, first in noise {i} of the batch; the model is unusable there.")
        return l2_per_sample(x, target)

    # state -----------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"logits": self.steps.logits.detach().clone(), "offsets": self.steps.offsets.detach().clone(),
                "cur": {k: v["cur"].clone() for k, v in self.data.items()}}

    def _load(self, state: dict[str, Any], data: bool) -> None:
        with torch.no_grad():
            self.steps.logits.copy_(state["logits"])
            self.steps.offsets.copy_(state["offsets"])
        if data:
            for k, v in state["cur"].items():
                self.data[k]["cur"] = v.clone()

    def validation_loss(self) -> float:
        d = self.data["valid"]
        with torch.no_grad():
            return float(self.losses(self.table(), d["cur"], d["target"], d["cond"]).mean())

    def _examine(self, v1: bool) -> bool:
        """LD3's _examine_checkpoint: keep the best, reload it and decay after ``patience`` worse checks. True = stop."""
        loss = self.validation_loss()
        self.history.append({"iteration": self.iterations, "valid_loss": loss})
        if loss < self.best_loss:
            self.best_loss, self.count_worse = loss, 0
            self.best_state = self._state()
            return False
        self.count_worse += 1
        if self.count_worse < self.patience:
            return False
        self._load(self.best_state, data=True)
        self.count_worse = 0
        g1 = self.opt1.param_groups[0]
        g1["lr"] = max(self.lr_decay * g1["lr"], self.min_lr1)
        if not v1:
            g2 = self.opt2.param_groups[0]
            g2["lr"] = max(self.lr_decay * g2["lr"], self.min_lr2)
            if g2["lr"] <= self.min_lr2:
                self.min_lr2_hits += 1
        return self.min_lr2_hits >= self.lr2_patience

    def _move_noises(self, d: dict[str, torch.Tensor], idx: torch.Tensor, e_new: torch.Tensor, ref: torch.Tensor) -> None:
        """Project the moved noises into the ball around the originals; keep a move only where it lowers the loss."""
        orig = d["orig"][idx]
        diff = (e_new - orig).flatten(1)
        norm = diff.norm(dim=1)
        scale = torch.where(norm > self.bound, self.bound / norm.clamp_min(1e-300), torch.ones_like(norm))
        e_new = orig + (diff * scale[:, None]).reshape(orig.shape)
        with torch.no_grad():
            better = self.losses(self.table(), e_new, d["target"][idx], cond_rows(d["cond"], idx)) < ref
        cur = d["cur"]
        cur[idx[better]] = e_new[better].to(cur.dtype)

    def _pass(self, split: str, v1: bool) -> bool:
        """One pass over ``split`` in batches: train moves the steps (and the noises); valid moves only its noises."""
        d = self.data[split]
        n = d["cur"].shape[0]
        order = torch.randperm(n, generator=self.gen) if split == "train" else torch.arange(n)
        for idx in order.split(self.batch_size):
            e = d["cur"][idx].clone().to(torch.float64).requires_grad_(self.bound > 0)
            train = split == "train"
            self.steps.logits.requires_grad_(train)
            self.steps.offsets.requires_grad_(train and not v1)
            vec = self.losses(self.table(grad=train), e, d["target"][idx], cond_rows(d["cond"], idx))
            vec.mean().backward()
            ref = vec.detach()
            e_new = (e - self.shift_lr * e.grad).detach() if e.grad is not None else None
            if train:
                torch.nn.utils.clip_grad_norm_([self.steps.logits], 1.0)
                torch.nn.utils.clip_grad_norm_([self.steps.offsets], 1.0)
                self.opt1.step()
                self.opt2.step()
                self.opt1.zero_grad(set_to_none=True)
                self.opt2.zero_grad(set_to_none=True)
                self.iterations += 1
                if not (torch.isfinite(self.steps.logits).all() and torch.isfinite(self.steps.offsets).all()):
                    raise NaNLossError(f"ld3 stopped at iteration {self.iterations}: the learned sigmas became NaN or "
                                       f"infinite (the model's gradient was not finite).")
                if self._examine(v1):
                    return True
            if e_new is not None:
                self._move_noises(d, idx, e_new, ref)
        return False

    def fit(self, rounds_v1: int = 2, rounds_v2: int = 5, progress: Any = None) -> SolverTable:
        """LD3's schedule: ``rounds_v1`` rounds of step sigmas only, then ``rounds_v2`` with the decoupled sigmas too;
        every round restarts from the best parameters. Returns the best table."""
        for r in range(rounds_v1 + rounds_v2):
            v1 = r < rounds_v1
            if r > 0:
                self._load(self.best_state, data=False)
                self.count_worse = 0
            self._examine(v1)
            stop = self._pass("train", v1) or (self.bound > 0 and self._pass("valid", v1))
            if progress is not None:
                progress(r, self.best_loss)
            if stop:
                break
        self._load(self.best_state, data=True)
        return self.table()


def fit(denoiser: Any, shape: Sequence[int], base: str, nfe: int, *, n_train: int = 50, n_valid: int = 50,
        seed: int = 0, teacher_solver: str = "unipc", teacher_nfe: int = 20, sigma_min: float = 0.002,
        sigma_max: float = 80.0, dtype: torch.dtype = torch.float32, rounds_v1: int = 2, rounds_v2: int = 5,
        progress: Any = None, cond_of: Callable[[Sequence[int]], Any] | None = None, native: np.ndarray | None = None,
        **kw: Any) -> tuple[SolverTable, LD3Fitter]:
    """Fit LD3 on the FIT seed range (``n_train`` then ``n_valid`` noises from ``seed``; each noise with its seed's
    cond ``cond_of(seeds)`` when the model has one, e.g. its prompt; ``native``: the teacher steps on the model's
    training times, ``teacher_table``); returns (table, fitter)."""
    seeds = seed_range(FIT_SEED_OFFSET, int(seed), int(n_train) + int(n_valid))
    e = make_noise(1, shape, seeds, dtype=torch.float64)[0]
    cond = cond_of_seeds(cond_of, seeds)
    t0 = time.perf_counter()
    y = teacher_targets(denoiser, e.to(dtype), teacher_solver, int(teacher_nfe), sigma_min, sigma_max, cond=cond,
                        seeds=seeds, native=native).to(dtype)
    teacher_seconds = time.perf_counter() - t0
    train, valid = slice(None, n_train), slice(n_train, None)
    fitter = LD3Fitter(denoiser, base, nfe, train=(e[train], y[train], cond_rows(cond, train)),
                       valid=(e[valid], y[valid], cond_rows(cond, valid)), sigma_min=sigma_min, sigma_max=sigma_max,
                       seed=seed, **kw)
    fitter.fit(rounds_v1, rounds_v2, progress)
    seconds = time.perf_counter() - t0
    step, _ = fitter.steps.sigmas()
    meta = {"method": f"ld3-{base}", "base_solver": base, "nfe": int(nfe),
            "ld3": {"teacher": f"{teacher_solver}@{teacher_nfe}" + ("" if native is None else " native"),
                    "n_train": int(n_train), "n_valid": int(n_valid),
                    "soft_teacher_bound": fitter.bound, "window": fitter.steps.window, "iterations": fitter.iterations,
                    "best_valid_l2": fitter.best_loss, "teacher_seconds": round(teacher_seconds, 2)},
            "fit_seconds": round(seconds, 2)}
    table = fitter.table(metadata=meta)
    table.metadata["step_sigmas"] = step.detach().tolist()
    return table, fitter


# --- the command -------------------------------------------------------------------------------
def validate(cfg: Any) -> None:
    """LD3 checks made before any work (called by the CLI)."""
    if cfg.get("resume") not in (None, False):
        raise ConfigError(f"ld3 has no resume (got resume={cfg.resume}): rerun the same command; its result is "
                          f"bit-identical.")
    validate_evaluate(cfg)
    if str(cfg.base) not in BASES:
        raise ConfigError(f"ld3 base must be one of {', '.join(BASES)}, got {cfg.base!r}.")
    try:
        check_teacher(str(cfg.teacher_solver), cfg.teacher_nfe, float(cfg.sigma_min), float(cfg.sigma_max),
                      str(cfg.teacher_grid), teacher_native(cfg))
    except ValueError as err:
        raise ConfigError(f"teacher: {err}") from None
    try:
        seed_range(FIT_SEED_OFFSET, int(cfg.fit_seed), int(cfg.n_train) + int(cfg.n_valid))
    except ValueError as err:
        raise ConfigError(f"fit seeds: {err}") from None
    for nfe in as_list(cfg.nfe):
        try:
            baselines.check_nfe(str(cfg.base), nfe)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        compare_tables(cfg, as_list(cfg.get("compare") or []), int(nfe))


def run(cfg: Any) -> list[str]:
    """`python -m optimize ld3`: fit, save ``<out_dir>/ld3-<base>-<model>-nfe<N>.safetensors`` and a sigma plot, then
    evaluate it beside its base solver (both end conventions) and the ``compare`` classics on the evaluation seeds.
    A killed run is rerun with the same command (bit-identical: see the module docstring)."""
    if cfg.get("num_threads") is not None:
        torch.set_num_threads(int(cfg.num_threads))
    device = str(cfg.device)
    model = load_model(cfg.model, device)
    out_dir = str(cfg.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    base = str(cfg.base)
    paths, jobs = [], []
    native = teacher_native(cfg)
    for nfe in as_list(cfg.nfe):
        nfe = int(nfe)
        print(f"ld3-{base}: nfe {nfe}, {cfg.n_train}+{cfg.n_valid} noises, teacher {cfg.teacher_solver}@{cfg.teacher_nfe} "
              f"({cfg.teacher_grid}), {cfg.rounds_v1}+{cfg.rounds_v2} rounds", flush=True)

        def report(r: int, best: float) -> None:
            print(f"  round {r + 1}: best validation L2 {best:.4g}", flush=True)

        try:
            table, _ = fit(model.denoiser, model.shape, base, nfe, n_train=int(cfg.n_train), n_valid=int(cfg.n_valid),
                           seed=int(cfg.fit_seed), teacher_solver=str(cfg.teacher_solver), teacher_nfe=int(cfg.teacher_nfe),
                           sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max), dtype=model.dtype,
                           rounds_v1=int(cfg.rounds_v1), rounds_v2=int(cfg.rounds_v2), progress=report,
                           window=float(cfg.window), batch_size=int(cfg.ld3_batch_size), patience=int(cfg.patience),
                           cond_of=model.cond_of, native=native)
        except NaNLossError as err:
            raise ConfigError(f"nfe {nfe}: {err}") from None
        table.metadata.update(model.table_metadata())
        path = os.path.join(out_dir, f"ld3-{base}-{model.name}-nfe{nfe}.safetensors")
        table.save(path)
        plain = baselines.build(base, nfe, sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max), end="sigma_min")
        plot_sigmas(np.asarray(plain.metadata["step_sigmas"][:-1]), np.asarray(table.metadata["step_sigmas"][:-1]),
                    path.replace(".safetensors", "-sigmas.png"))
        print(f"wrote {path} (fit {table.metadata['fit_seconds']} s, {table.metadata['ld3']['iterations']} steps)", flush=True)
        paths.append(path)
        own = [(base, baselines.build(base, nfe, sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max))),
               (f"{base}(end=sigma_min)", plain)]
        others = [(label, t) for label, t in compare_tables(cfg, as_list(cfg.get("compare") or []), nfe)
                  if label not in dict(own)]
        jobs += [(label, t, {}) for label, t in [*own, *others, (f"ld3-{base}", table)]]
    if cfg.evaluate and jobs:
        judge = Judge.for_model(cfg.model, model.shape, device, n_boot=int(cfg.n_boot))
        evaluate_jobs(cfg, model, judge, jobs)
    return paths
