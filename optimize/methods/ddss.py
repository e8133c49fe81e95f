"""DDSS over GGDM: learn an N-step sampler table by backpropagating sample quality through the whole chain
(Watson et al., "Learning fast samplers for diffusion models by differentiating through sample quality").

The learned object is a solver table (DESIGN.md, "The table"): sigmas ``[N]`` and coef ``[N+1, K+2N]`` over
the basis ``e_0..e_{K-1}, x_0..x_{N-1}, d_0..d_{N-1}``. Every forward compiles the parameters into a
``SolverTable`` whose tensors require grad and samples it with ``samplers.sample(..., support=...,
checkpoint=True)``, the project's single executor (no sampling loop here).

Families (``family=``):

- ``ggdm`` (the paper): row i (the input of evaluation i) mixes the current x0-prediction ``d_{i-1}`` and ALL
  previous iterates ``x_0..x_{i-1}``; the output row mixes ``d_{N-1}`` and every ``x_j``. About N(N+3)/2
  coefficients. With ``learn_noise=true`` row i (1 <= i < N) also gets a learned multiple of a fresh noise
  vector ``e_i`` (K = N); otherwise K = 1. Initialised at DDIM (``euler``).
- ``ggdm_mc``: ggdm restricted to marginal-consistent tables (the paper's Theorem 1, in sigma space). In the forward
  process ``x_0 = x0 + sigma_0 e_0`` (the prior drops the x0 term) and, with every ``d = x0``, by induction every
  iterate is ``x_i = x0 + B_i . e``; ``q(x_i | x0) = N(x0, sigma_i^2 I)`` holds iff row i's x0 weight is 1,
  ``b_i = 1 - sum_j a_ij`` (a_ij: weight of x_j, b_i: of d_{i-1}), and ``|B_i| = sigma_i`` with
  ``B_i = sum_j a_ij B_j + c_i u_i`` (c_i: weight of the fresh e_i; sigma_N = 0 for the output). K = 1: B_j = sigma_j,
  so ``sum_j a_ij sigma_j = sigma_i``, linear: ``a_i0`` (divided by sigma_0 = sigma_max, the best-conditioned choice)
  and ``b_i`` are solved, ``a_i1..a_i,i-1`` free (N(N-1)/2 numbers). K = N (``learn_noise``): the constraint is
  ``|sum_j a_ij B_j|^2 + c_i^2 = sigma_i^2`` (the covariance recursion); row i's free ``(a_i, c_i)`` is rescaled
  onto it (always exact, no clamp; its scale is a gauge), b_i solved, and the output row is ``d_{N-1}`` (once any
  fresh noise is injected no other output row has zero noise). The learned sigmas enter the constraints, so every
  table the optimiser sees is consistent to rounding; DDIM/euler is the initial member (the solve's ~1e-17
  residual at the initial table is a constant, ``mc_fix``, so step 0 is euler bit for bit).
- ``full``: every causal entry (``x_j`` and ``d_j`` for j < i, fresh noise as above) - a family that contains
  every one-evaluation-per-step classic solver, so ``init=`` may be any of INITS (e.g. ``dpmpp_2m``).

Row 0 is ``sigma_max e_0`` (fixed: every table starts from the same pure noise, so evaluation's reference RMSE
applies) and sigma_0 = sigma_max.

Parametrisation (all float64). With ``C0``/``s0`` the initial table and ``theta0`` its sigma logits::

    sigma(theta) = clamp(s0 * exp(Lspan * (F(theta0) - F(theta))))        (cumulative softmax, see sigmas())
    coef(theta, u) = (C0 + P * u) + (S(sigma(theta)) - S(s0))

- ``F_i(theta) = sum_{j<i} softmax(theta)_j`` over N buckets (N-1 gaps in log sigma, then a slack bucket down
  to sigma_min): the learned sigmas stay ordered inside [sigma_min, sigma_max] whatever theta is.
- ``S(sigma)`` is the Euler/DDIM skeleton of a schedule (row i: ``x_{i-1}`` weight ``s_i/s_{i-1}``,
  ``d_{i-1}`` weight ``1 - s_i/s_{i-1}``): moving a time step moves the table's first-order structure with it
  instead of only relabelling the noise level the denoiser is told.
- ``u`` are free offsets on the family's support, preconditioned by ``P[i, c] = tau_i / std_c`` with the
  natural scale ``tau = sqrt(sigma^2 + sigma_data^2)`` of an input (sigma_data for the output row and for
  ``d_j``, 1 for ``e_k``), so a unit of any u moves its row by about one unit of the row's own scale.

Both differences are exactly zero at theta = theta0, u = 0, so step 0 reproduces the initial table bit for bit.

Loss: unbiased MMD^2 with the cubic polynomial kernel (the KID estimator, ``optimize.evaluation.metrics``) between the
features of a fresh batch of samples and of the whole training set (the real-real term is a constant computed
once): the first feature net of the model (``model.features[0]``) for images, raw coordinates for gmm/toy2d. With
``kid_against=teacher`` the reference is the teacher pool's solves instead (the match loss's targets), so a model
without data learns a distribution loss from its prompts alone.

Feature match (``feature_weight`` > 0, with a match loss): a perceptual term beside the same-noise L2,
``feature_weight * mean_i ||phi(D(x_i)) - phi(D(y_i))||^2 / dim``, with ``phi`` the first feature net, ``D`` the VAE's
decoder (the identity for pixel models), ``x_i`` the table's sample and ``y_i`` the teacher's solve from the same noise.
Under that coupling ``dim`` times the mean bounds the squared 2-Wasserstein distance between the two feature
distributions, which bounds their FD (the Gaussian fits' W2^2, Gelbrich): a per-sample bound on the distance to the
teacher's distribution on that net, from prompts alone (feature nets, no data).

Optimiser: Adam (betas 0.9, 0.99), learning rate ``lr`` for u and ``sigma_lr`` for theta, linear warm-up over
``warmup_steps`` then cosine decay to ``min_lr_ratio`` x lr at ``steps``; gradient-norm clipping at
``grad_clip``. Validation every ``val_every`` steps (and before the first) samples ``n_val`` fixed seeds of the
selection range (``optimize.base.seeds.VAL_SEED_OFFSET``, disjoint from the evaluation seeds) and scores KID/FD against
the TRAINING set with the first feature net only; the table with the best ``monitor`` is kept and exported. The
held-out set and the second feature net are never seen by training or selection, so the reported held-out FD and
FD-b are independent of every choice the learner made (training-set FD is not: the loss is KID against it).

Text-to-image models (the KID loss scores their samples decoded, differentiably, by the VAE): the
teacher pool, the training rows drawn from it and the validation set each carry their seed's cond (``Model.cond_of``,
``optimize.base.conds``), and validation samples are decoded (``Model.decode``) before the judge. Under DDP
(``devices=N strategy=ddp``) the teacher pool is sharded: process r solves and trains on the pool seeds i = r mod N
(with their prompts), so the pool's cost and the rows of each step are split over the processes.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from samplers import SolverTable, baselines, make_noise, sample
from samplers.t2i import pipeline_class
from samplers.table import FORMAT_VERSION

from optimize.base import TABLE_PREFIX, ConfigError, as_list, resolve_path
from optimize.training.checkpoints import pick_resume, resume_path
from optimize.evaluation.evaluate import Judge, Model, decoded, evaluate_jobs, load_model
from optimize.evaluation.judge import check_features
from optimize.base.keys import Key, count, rate
from optimize.base.conds import cond_of_seeds, cond_rows
from optimize.training.distill import check_teacher, teacher_native, teacher_targets
from optimize.evaluation.metrics import poly_kernel
from optimize.evaluation.results import plot_sigmas
from optimize.training.runs import NaNLossError, TrainingModule, compare_tables, ticks, trainer_parts
from optimize.base.seeds import FIT_SEED_OFFSET, VAL_SEED_OFFSET, seed_range



def needs_data(cfg: Any) -> bool:
    """Reference data and feature nets are needed unless the loss and the monitor are both the teacher match (a
    text-to-image model learns from prompts alone: loss=match monitor=match), or the KID loss is against the teacher's
    own samples (``kid_against=teacher``: feature nets only)."""
    return ("kid" in str(cfg.loss) and str(cfg.get("kid_against", "data")) == "data") or str(cfg.monitor) != "match"


def needs_features(cfg: Any) -> bool:
    """Feature nets are needed wherever data are, and by any KID loss (``kid_against=teacher`` included)."""
    return needs_data(cfg) or "kid" in str(cfg.loss) or feature_match(cfg)


def feature_match(cfg: Any) -> bool:
    """Whether the match loss carries the first feature net's term (``feature_weight`` > 0 with a match loss)."""
    return "match" in str(cfg.loss) and float(cfg.get("feature_weight", 0.0)) > 0


KEYS = {  # this method's typed keys (optimize.base.keys; shared ones are declared there)
    "val_every": count(low=0), "n_val": count(10**8), "n_match": count(10**8), "match_weight": Key("num", 0),
    "feature_weight": Key("num", 0), "sigma_lr": rate()}
FAMILIES = ("ggdm", "ggdm_mc", "full")
INITS = ("euler", "dpmpp_2m", "dpmpp_3m", "ipndm", "unipc")  # one evaluation per step, strictly decreasing sigmas
LOSSES = ("kid", "match", "kid+match")
KID_AGAINST = ("data", "teacher")  # the KID loss's reference: the training set, or the teacher pool's solves (no data)
MATCH_SPACES = ("latent", "decoded")  # where the match loss and monitor compare: the model's space, or the VAE's images
MONITORS = ("fd_train", "kid_train", "match")  # selection sees only the training set (held-out data and FD-b stay
# independent) or, with match, the mean squared distance to the teacher's solve on the validation seeds
SLACK_FLOOR = 1e-3  # initial share of the slack bucket (log sigma span below the last sigma) when it is ~0


# --- the learned table ---------------------------------------------------------------------------
def family_support(family: str, n: int, k: int) -> np.ndarray:
    """Boolean ``[N+1, K+2N]`` mask of the learned coefficients (row 0 is never learned).

    ggdm: row i in 1..N uses ``d_{i-1}`` and ``x_0..x_{i-1}``; full: every ``x_j``, ``d_j`` with j < i.
    With K > 1, row i in 1..N-1 also uses its fresh noise ``e_i``. ggdm_mc has ggdm's support (with K > 1 its output
    row is ``d_{N-1}`` alone); only part of it is free (``family_free``), the rest is solved from the constraints.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown ddss family {family!r}; valid: {', '.join(FAMILIES)}.")
    mask = np.zeros((n + 1, k + 2 * n), dtype=bool)
    if family == "ggdm_mc" and k > 1:
        mask[1:n] = family_support("ggdm", n, k)[1:n]
        mask[n, k + 2 * n - 1] = True  # output = d_{N-1}: the only consistent output row once fresh noise is injected
        return mask
    for i in range(1, n + 1):
        mask[i, k:k + i] = True  # x_0..x_{i-1}
        if family in ("ggdm", "ggdm_mc"):
            mask[i, k + n + i - 1] = True  # d_{i-1}
        else:
            mask[i, k + n:k + n + i] = True  # d_0..d_{i-1}
        if k > 1 and i < n:
            mask[i, i] = True  # fresh noise e_i
    return mask


def family_free(family: str, n: int, k: int) -> np.ndarray:
    """Boolean ``[N+1, K+2N]`` mask of the free parameters ``u``: the family's support, except for ggdm_mc.

    ggdm_mc, K = 1: row i in 2..N frees ``x_1..x_{i-1}``; its ``x_0`` and ``d_{i-1}`` are solved (N(N-1)/2 free).
    ggdm_mc, K = N: row i in 1..N-1 frees ``x_0..x_{i-1}`` and ``e_i`` (then rescaled); ``d_{i-1}`` is solved, the
    output row is fixed.
    """
    mask = family_support(family, n, k)
    if family != "ggdm_mc":
        return mask
    mask = mask.copy()
    mask[:, k + n:] = False  # d_{i-1}: the x0 coefficient, solved
    if k == 1:
        mask[:, k] = False  # x_0: the noise-scale coefficient, solved
    else:
        mask[n] = False
    return mask


def init_file_table(init: str, nfe: int, model: Model | None = None) -> SolverTable:
    """The table of ``init=table:PATH``: deterministic (K = 1), ``nfe`` evaluations at strictly decreasing sigmas starting
    at the same pure noise (row 0 = sigma_0 e_0), checked against ``model`` when given (``Model.load_table``: learned
    at another guidance scale only with model.any_guidance)."""
    path = init[len(TABLE_PREFIX):]
    if not os.path.isfile(path):
        raise ValueError(f"init table file {path} does not exist.")
    table = model.load_table(path) if model is not None else SolverTable.load(path)
    sig, coef = table.sigmas.numpy(), table.coef.numpy()
    row0 = np.zeros_like(coef[0])
    row0[0] = sig[0]
    if table.n_noise != 1 or table.nfe != nfe or np.any(np.diff(sig) >= 0) or not np.array_equal(coef[0], row0):
        raise ValueError(f"init table {path} must be deterministic (K = 1) with nfe={nfe} evaluations at strictly decreasing "
                         f"sigmas starting from sigma_0 e_0; got K = {table.n_noise}, NFE {table.nfe}.")
    return table


def initial_table(init: str, nfe: int, learn_noise: bool, *, sigma_min: float, sigma_max: float,
                  schedule: str = "karras", rho: float = 7.0, end: str = "zero") -> SolverTable:
    """The table training starts from (a classic solver, or ``table:PATH``), widened to K = N noise columns (all zero
    but e_0) with learn_noise."""
    if init.startswith(TABLE_PREFIX):
        table = init_file_table(init, nfe)
    elif init not in INITS:
        raise ValueError(f"ddss init must be one of {', '.join(INITS)} or table:PATH, got {init!r}.")
    else:
        extra = {"rho": rho} if schedule == "karras" else {}
        table = baselines.build(init, nfe, sigma_min=sigma_min, sigma_max=sigma_max, schedule=schedule, end=end, **extra)
    if not learn_noise or nfe < 2:
        return table
    coef = torch.zeros(nfe + 1, nfe + 2 * nfe, dtype=torch.float64)
    coef[:, 0] = table.coef[:, 0]
    coef[:, nfe:] = table.coef[:, 1:]
    return SolverTable(table.sigmas, coef, table.metadata)


def _gap_logits(sig: torch.Tensor, sigma_min: float) -> tuple[torch.Tensor, float]:
    """theta0 and the log span so that ``log s_i = log s_0 - span * F_i(theta0)``: N-1 gaps, then the slack."""
    logs = sig.log()
    gaps = logs[:-1] - logs[1:]
    slack = (logs[-1] - math.log(sigma_min)).clamp(min=0)
    total = float(gaps.sum() + slack)
    floor = SLACK_FLOOR * max(total, 1e-12)
    slack = slack.clamp(min=floor)
    parts = torch.cat([gaps, slack.reshape(1)])
    return parts.log(), float(parts.sum())


def euler_skeleton(sig: torch.Tensor, n_cols: int, k: int) -> torch.Tensor:
    """``[N+1, K+2N]``: the sigma-dependent Euler/DDIM entries of rows 1..N-1 (x_{i-1}: s_i/s_{i-1}, d_{i-1}: 1 - that)."""
    n = sig.shape[0]
    out = sig.new_zeros(n + 1, n_cols)
    if n > 1:
        r = sig[1:] / sig[:-1]
        rows = torch.arange(1, n)
        out = out.index_put((rows, k + rows - 1), r)
        out = out.index_put((rows, k + n + rows - 1), 1 - r)
    return out


class GGDMTable(nn.Module):
    """Parameters ``u`` (coefficient offsets on the family's support) and ``theta`` (sigma logits) of an N-step table.

    ``table()`` compiles them into a differentiable SolverTable; ``support`` is what ``sample`` plans with.
    """

    def __init__(self, nfe: int, family: str = "ggdm", init: str = "euler", *, learn_sigmas: bool = True,
                 learn_noise: bool = False, sigma_min: float = 0.002, sigma_max: float = 80.0, schedule: str = "karras",
                 rho: float = 7.0, sigma_data: float = 0.5, end: str = "zero"):
        super().__init__()
        if family in ("ggdm", "ggdm_mc") and init != "euler":
            raise ValueError(f"family {family} starts from DDIM (init=euler); init={init} needs family=full.")
        base = initial_table(init, nfe, learn_noise, sigma_min=sigma_min, sigma_max=sigma_max, schedule=schedule, rho=rho,
                             end=end)
        self.nfe, self.n_noise, self.family, self.init = nfe, base.n_noise, family, init
        self.base_metadata = dict(base.metadata)
        n, k = nfe, base.n_noise
        mask = family_free(family, n, k)
        self.support = family_support(family, n, k) | base.support()
        self.register_buffer("coef0", base.coef.clone())
        self.register_buffer("sigma0", base.sigmas.clone())
        self.register_buffer("mask", torch.from_numpy(mask))
        # preconditioner P[i, c] = tau_i / std_c
        s = base.sigmas
        tau_rows = torch.cat([(s**2 + sigma_data**2).sqrt(), torch.tensor([sigma_data], dtype=torch.float64)])
        std_cols = torch.cat([torch.ones(k, dtype=torch.float64), (s**2 + sigma_data**2).sqrt(),
                              torch.full((n,), sigma_data, dtype=torch.float64)])
        self.register_buffer("precond", tau_rows[:, None] / std_cols[None, :])
        self.u = nn.Parameter(torch.zeros(int(mask.sum()), dtype=torch.float64))
        self.learn_sigmas = bool(learn_sigmas and n > 1)
        theta0, span = _gap_logits(s, sigma_min)
        self.span = span
        self.sigma_lo, self.sigma_hi = min(sigma_min, float(s.min())), max(sigma_max, float(s.max()))
        self.register_buffer("theta0", theta0)
        self.theta = nn.Parameter(theta0.clone()) if self.learn_sigmas else None
        # ggdm_mc: the rounding residual of the constraint solve at the initial table (~1e-17), so that step 0 is the
        # initial table bit for bit (coef() before the solve is exactly coef0 at theta0, u = 0)
        self.register_buffer("mc_fix", base.coef - self._consistent(base.coef, s) if family == "ggdm_mc" else None)

    # cumulative softmax ---------------------------------------------------------------------------
    @staticmethod
    def _positions(theta: torch.Tensor) -> torch.Tensor:
        """F_i = sum_{j<i} softmax(theta)_j for i = 0..N-1 (F_0 = 0)."""
        p = torch.softmax(theta, dim=0)
        return torch.cat([p.new_zeros(1), torch.cumsum(p[:-1], dim=0)]) if p.shape[0] > 1 else p.new_zeros(1)

    def sigmas(self) -> torch.Tensor:
        """Learned evaluation sigmas ``[N]``: sigma_0 = sigma_max, then ordered inside [sigma_min, sigma_max]."""
        if self.theta is None:
            return self.sigma0
        shift = self._positions(self.theta0) - self._positions(self.theta)  # exactly 0 at theta = theta0
        return (self.sigma0 * torch.exp(self.span * shift)).clamp(self.sigma_lo, self.sigma_hi)

    def coef(self, sig: torch.Tensor | None = None) -> torch.Tensor:
        """Learned coefficients ``[N+1, K+2N]`` (C0 + P u) + (S(sigma) - S(sigma0))."""
        sig = self.sigmas() if sig is None else sig
        delta = torch.zeros_like(self.coef0).masked_scatter(self.mask, self.u) * self.precond
        out = self.coef0 + delta
        if self.theta is not None:
            cols = self.coef0.shape[1]
            out = out + (euler_skeleton(sig, cols, self.n_noise) - euler_skeleton(self.sigma0, cols, self.n_noise))
        if self.family == "ggdm_mc":
            out = self._consistent(out, sig) + self.mc_fix
        return out

    def _consistent(self, a: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        """ggdm_mc: the marginal-consistent table whose free entries are those of ``a`` (module docstring).

        K = 1: row i (1..N, sigma_N = 0) gets ``x_0`` weight ``(sigma_i - sum_{j>=1} a_ij sigma_j) / sigma_0`` and
        ``d_{i-1}`` weight ``1 - sum_j a_ij``. K = N: row i (1..N-1) rescales its ``(a_i, c_i)`` so that the noise
        loading ``B_i = sum_j a_ij B_j + c_i u_i`` has norm sigma_i, then ``d_{i-1}`` weight ``1 - sum_j a_ij``;
        the output row is ``d_{N-1}``.
        """
        n, k = self.nfe, self.n_noise
        if k == 1:
            xs = a[1:, k + 1:k + n]  # x_1..x_{N-1} of rows 1..N (free, strictly causal)
            target = torch.cat([sig[1:], sig.new_zeros(1)])
            a0 = (target - xs @ sig[1:]) / sig[0]
            b = 1 - a0 - xs.sum(dim=1)
            rows = torch.cat([a[1:, :k], a0[:, None], xs, torch.diag_embed(b)], dim=1)
            return torch.cat([a[:1], rows])
        loads = [torch.cat([sig[:1], sig.new_zeros(k - 1)])]  # B_0: x_0 = sigma_0 e_0
        rows = [a[0]]
        for i in range(1, n):
            x, c = a[i, k:k + i], a[i, i]
            w = x @ torch.stack(loads)  # noise loading of sum_j a_ij x_j (its e_i entry is 0)
            scale = sig[i] / ((w * w).sum() + c * c).clamp_min(1e-300).sqrt()
            x, c = scale * x, scale * c
            loads.append(scale * w + c * torch.eye(k, dtype=a.dtype, device=a.device)[i])
            z = a.new_zeros
            rows.append(torch.cat([z(i), c[None], z(k - i - 1), x, z(n - i), z(i - 1), (1 - x.sum())[None], z(n - i)]))
        rows.append(torch.cat([a.new_zeros(k + 2 * n - 1), a.new_ones(1)]))
        return torch.stack(rows)

    def table(self, metadata: dict | None = None) -> SolverTable:
        """The differentiable table (no validation: the hot loop)."""
        sig = self.sigmas()
        return SolverTable(sig, self.coef(sig), metadata, check=False)

    def frozen(self, metadata: dict | None = None) -> SolverTable:
        """A detached, validated float64 copy of the current table."""
        with torch.no_grad():
            sig = self.sigmas()
            return SolverTable(sig.detach().cpu().clone(), self.coef(sig).detach().cpu().clone(), metadata)


def mmd_loss(gen: torch.Tensor, real: torch.Tensor, real_term: torch.Tensor | float) -> torch.Tensor:
    """Unbiased MMD^2 (cubic kernel) of generated vs real features, with the constant real-real term precomputed
    (``real_term = mean_{i != j} k(r_i, r_j)``); equals ``metrics.mmd2_unbiased(gen, real)``."""
    a = gen.reshape(gen.shape[0], -1).to(torch.float64)
    b = real.to(a.device, torch.float64)
    m = a.shape[0]
    k_aa = poly_kernel(a, a)
    term_a = (k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1))
    return term_a + real_term - 2.0 * poly_kernel(a, b).mean()


def real_term(real: torch.Tensor) -> torch.Tensor:
    """``mean_{i != j} k(r_i, r_j)`` of the real features (the constant part of the loss)."""
    b = real.to(torch.float64)
    k = poly_kernel(b, b)
    return (k.sum() - k.diagonal().sum()) / (b.shape[0] * (b.shape[0] - 1))


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``min_ratio`` at ``steps``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# --- Lightning module ------------------------------------------------------------------------------
class DDSSModule(TrainingModule):
    """A GGDM / full-table sampler trained with the KID loss through the whole sampling chain.

    Call ``attach(model, judge)`` (an ``optimize.evaluation.evaluate.Model`` and ``Judge``) before fitting; the denoiser and
    feature nets are kept outside the state dict (checkpoints hold only the table parameters and the best table).
    Clock, NaN stop and the history in checkpoints come from ``optimize.training.runs.TrainingModule``.
    """

    method = "ddss"

    def __init__(self, nfe: int, family: str = "ggdm", init: str = "euler", *, learn_sigmas: bool = True,
                 learn_noise: bool = False, sigma_min: float = 0.002, sigma_max: float = 80.0, schedule: str = "karras",
                 rho: float = 7.0, sigma_data: float = 0.5, batch_size: int = 256, lr: float = 2e-3, sigma_lr: float = 1e-2,
                 warmup_steps: int = 20, min_lr_ratio: float = 0.05, steps: int = 500, remat: bool = True,
                 val_every: int = 100, n_val: int = 500, monitor: str = "fd_train", seed: int = 0, end: str = "zero",
                 loss: str = "kid", match_weight: float = 1e4, teacher_solver: str = "unipc", teacher_nfe: int = 20,
                 n_match: int = 1024, match_space: str = "latent", teacher_grid: str = "karras", kid_against: str = "data",
                 feature_weight: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        if loss not in LOSSES:
            raise ValueError(f"unknown ddss loss {loss!r}; valid: {', '.join(LOSSES)}.")
        if match_space not in MATCH_SPACES:
            raise ValueError(f"unknown match_space {match_space!r}; valid: {', '.join(MATCH_SPACES)}.")
        if kid_against not in KID_AGAINST:
            raise ValueError(f"unknown kid_against {kid_against!r}; valid: {', '.join(KID_AGAINST)}.")
        self.sampler = GGDMTable(nfe, family, init, learn_sigmas=learn_sigmas, learn_noise=learn_noise, sigma_min=sigma_min,
                                 sigma_max=sigma_max, schedule=schedule, rho=rho, sigma_data=sigma_data, end=end)
        self.register_buffer("best_coef", self.sampler.coef0.clone())
        self.register_buffer("best_sigmas", self.sampler.sigma0.clone())
        self.register_buffer("best_score", torch.tensor(float("inf"), dtype=torch.float64))
        self.register_buffer("best_step", torch.tensor(-1, dtype=torch.int64))
        self._ext: dict[str, Any] = {}  # model, judge, real features: not parameters, not in checkpoints
        self.export_path: str | None = None
        self.export_metadata: dict[str, Any] = {}
        self.exported: str | None = None

    # outside objects ------------------------------------------------------------------------------
    def attach(self, model: Any, judge: Any, native: np.ndarray | None = None) -> "DDSSModule":
        """Use ``model`` (an evaluate.Model) and ``judge`` (an evaluate.Judge; None with loss=match monitor=match, which
        need no data) for sampling, loss and validation; ``native``: the model's training sigmas (increasing), the
        grid of the teacher solve with ``teacher_grid=native``."""
        den = model.denoiser
        if isinstance(den, nn.Module):
            den.requires_grad_(False).eval()
        self._ext = {"model": model, "native": native if self.hparams.get("teacher_grid") == "native" else None}
        if ("kid" in str(self.hparams.loss) and not self.against_teacher) or str(self.hparams.monitor) != "match":
            name = next(iter(judge.features))
            real = judge.real_feats("train", name)
            # training and selection see the training set and the first feature net only (no held-out data, no FD-b)
            val_judge = judge.restricted(splits=["train"], features=[name], n_boot=0)
            self._ext.update(judge=val_judge, feature=name, real=real, real_term=real_term(real))
        elif self.on_pool_features:  # the first feature net only; the KID reference
            name = next(iter(judge.features))  # (and the feature match's targets) come with the teacher pool
            self._ext.update(judge=judge.restricted(splits=[], features=[name], n_boot=0), feature=name)
        if str(self.hparams.monitor) == "match":
            self._ext["val_targets"] = self.match_targets(model, self.val_seeds())
        return self

    def match_targets(self, model: Any, seeds: Sequence[int]) -> torch.Tensor:
        """The fine teacher solve (teacher_solver at teacher_nfe on teacher_grid) from the unit noise e_0 of each seed,
        with its cond (decoded by the VAE with ``match_space=decoded``)."""
        hp = self.hparams
        e = make_noise(1, model.shape, seeds, dtype=model.dtype)[0]
        y = teacher_targets(model.denoiser, e.to(self.device), str(hp.teacher_solver), int(hp.teacher_nfe),
                            float(hp.sigma_min), float(hp.sigma_max), cond=cond_of_seeds(model.cond_of, seeds, self.device),
                            seeds=list(seeds), native=self._ext.get("native"))
        return self.in_match_space(y)

    def in_match_space(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` where the match monitor and targets compare: as is (``match_space=latent``) or decoded by the model's
        VAE (``decoded``; the training step decodes its samples differentiably itself)."""
        if self.hparams.match_space == "latent":
            return x
        return decoded(self.model.decode, x).to(x.device)

    def match_pool(self, model: Any, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(unit noises [n, *shape], the fine teacher solve from each, their per-row cond or None) on this process's
        share of the FIT seeds (seed i of the n_match goes to process i mod world_size: under DDP each process solves
        and trains on its own seeds and prompts): the targets of the match loss (same-noise distance to the teacher, as
        LD3); a text-to-image model's noise of seed s is solved with prompt ``cond_of`` (s)."""
        hp = self.hparams
        seeds = seed_range(FIT_SEED_OFFSET, int(hp.seed), int(hp.n_match))[rank::world_size]
        e = make_noise(1, model.shape, seeds, dtype=model.dtype)[0]
        cond = cond_of_seeds(model.cond_of, seeds, self.device)
        y = teacher_targets(model.denoiser, e.to(self.device), str(hp.teacher_solver), int(hp.teacher_nfe),
                            float(hp.sigma_min), float(hp.sigma_max), cond=cond, seeds=seeds,
                            native=self._ext.get("native"))
        return e, self.in_match_space(y), cond

    @property
    def against_teacher(self) -> bool:
        """The KID loss against the teacher pool's solves (``kid_against=teacher``) rather than the training set."""
        return "kid" in str(self.hparams.loss) and self.hparams.get("kid_against", "data") == "teacher"

    @property
    def on_pool_features(self) -> bool:
        """Whether a loss term compares with the first feature net on the teacher pool's solves (``pool_features``):
        the KID loss against the teacher, or the feature match."""
        return self.against_teacher or feature_match(self.hparams)

    def pool_features(self, pool_y: torch.Tensor) -> None:
        """The first feature net on the teacher pool's solves (``pool_y``, in match space; decoded first for a latent
        text-to-image model): the KID loss's reference with ``kid_against=teacher`` (and its constant term), and the
        targets of the feature match (row i: the solve from pool noise i)."""
        judge, m = self._ext["judge"], self.model
        with torch.no_grad():
            y = decoded(m.decode, pool_y) if m.decode is not None and self.hparams.match_space == "latent" else pool_y
            y = y.clamp(-1, 1) if judge.clip else y
            feats = torch.cat([judge.feats(self._ext["feature"], b.to(self.device)) for b in y.split(256)])
        if self.against_teacher:
            self._ext.update(real=feats, real_term=real_term(feats))
        self._ext["pool_feats"] = feats

    @property
    def model(self) -> Any:
        if "model" not in self._ext:
            raise RuntimeError("DDSSModule needs attach(model, judge) before training.")
        return self._ext["model"]

    # sampling and loss ----------------------------------------------------------------------------
    def noise(self, batch: int, step: int, rank: int = 0) -> torch.Tensor:
        """Fresh standard-normal noise ``[K, B, *shape]`` for a training step, reproducible from (seed, rank, step)."""
        gen = torch.Generator().manual_seed((int(self.hparams.seed) * 1_000_003 + rank) * 1_000_000_007 + step)
        m = self.model
        return torch.randn((self.sampler.n_noise, batch, *m.shape), generator=gen, dtype=m.dtype).to(self.device)

    def generate(self, noise: torch.Tensor, remat: bool | None = None, cond: Any = None) -> torch.Tensor:
        """Samples of the current (differentiable) table from ``noise`` (with its per-row ``cond``, if any)."""
        remat = bool(self.hparams.remat) if remat is None else remat
        return sample(self.sampler.table(), self.model.denoiser, noise, cond, support=self.sampler.support,
                      checkpoint=remat)

    def features_of(self, x: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """The first feature net on samples ``x``, differentiably (a latent text-to-image model's samples decoded
        first by its VAE, unless given as ``images``)."""
        judge = self._ext["judge"]
        if self.model.decode is not None:
            x = self.model.decode(x, grad=True) if images is None else images
        x = x.clamp(-1, 1) if judge.clip else x
        return judge.features[self._ext["feature"]](x)

    def loss_of(self, x: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """KID loss (unbiased MMD^2, cubic kernel) of samples ``x`` against the training-set features (a latent
        text-to-image model's samples decoded first, differentiably, by its VAE, unless given as ``images``)."""
        return self.kid_of(self.features_of(x, images))

    def kid_of(self, feats: torch.Tensor) -> torch.Tensor:
        """The KID loss of sample features ``feats`` (``features_of``) against the reference's."""
        real = self._ext["real"]
        if real.device != feats.device:  # cached once per device
            real = self._ext["real"] = real.to(feats.device)
            self._ext["real_term"] = torch.as_tensor(self._ext["real_term"]).to(feats.device)
        return mmd_loss(feats, real, self._ext["real_term"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        hp, step, rank = self.hparams, int(self.global_step), int(self.global_rank)
        noise = self.noise(int(hp.batch_size), step, rank)
        target = cond = None
        if "pool" not in self._ext and ("match" in str(hp.loss) or self.against_teacher):  # solved on first use, when
            world = int(self.trainer.world_size) if self._trainer is not None else 1  # the process's rank is known
            self._ext["pool"] = self.match_pool(self.model, rank, world)
            if "match" in str(hp.loss) and self._ext["pool"][0].shape[0] < int(hp.batch_size):
                raise ConfigError(f"batch_size ({hp.batch_size}) exceeds this process's share of the teacher pool "
                                  f"(n_match={hp.n_match} over {world} processes); raise n_match or lower batch_size.")
            if self.on_pool_features:
                self.pool_features(self._ext["pool"][1])
        if "match" in str(hp.loss):  # e_0 from the teacher pool (fresh e_1.. stay fresh), target = the teacher's sample
            pool_e, pool_y, pool_c = self._ext["pool"]
            gen = torch.Generator().manual_seed((int(hp.seed) * 1_000_003 + rank) * 1_000_000_009 + step)
            idx = torch.randperm(pool_e.shape[0], generator=gen)[: int(hp.batch_size)]
            noise[0] = pool_e[idx].to(noise)
            target = pool_y[idx].to(noise)
            cond = cond_rows(pool_c, idx)  # the prompts of the pool rows drawn
        x = self.generate(noise, cond=cond)
        featured = "kid" in str(hp.loss) or feature_match(hp)  # the sample's features enter the loss
        # a latent model's samples decoded once, for the features and a decoded-space match alike
        images = self.model.decode(x, grad=True) if self.model.decode is not None and (
            featured or hp.match_space == "decoded") else None
        # ... and their features computed once, for the KID loss and the feature match alike
        feats = self.features_of(x, images) if featured else None
        loss = self.kid_of(feats) if "kid" in str(hp.loss) else x.new_zeros((), dtype=torch.float64)
        if target is not None:
            matched = images if hp.match_space == "decoded" else x
            loss = loss + float(hp.match_weight) * (matched - target).pow(2).flatten(1).mean(1).mean()
        if feature_match(hp):  # the perceptual term: features of the sample against those of the teacher's solve
            loss = loss + float(hp.feature_weight) * (feats - self._ext["pool_feats"][idx].to(feats)).pow(2).mean(1).mean()
        self.check_loss(loss, hint="try a smaller lr or sigma_lr")
        self.history["loss"].append(float(loss.detach()))
        self.log("loss", loss.detach().float(), prog_bar=True, on_step=True)
        return loss

    def configure_optimizers(self) -> Any:
        """Adam on u (lr) and the sigma logits (sigma_lr); warm-up then cosine decay (lr_factor)."""
        hp = self.hparams
        groups = [{"params": [self.sampler.u], "lr": float(hp.lr)}]
        if self.sampler.theta is not None:
            groups.append({"params": [self.sampler.theta], "lr": float(hp.sigma_lr)})
        opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, int(hp.steps), int(hp.warmup_steps), float(hp.min_lr_ratio)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # validation: fixed seeds, best table kept -----------------------------------------------------
    def val_seeds(self) -> range:
        first = VAL_SEED_OFFSET + int(self.hparams.seed)
        return range(first, first + int(self.hparams.n_val))

    def val_noise(self) -> torch.Tensor:
        m = self.model
        return make_noise(self.sampler.n_noise, m.shape, self.val_seeds(), dtype=m.dtype, device=self.device)

    def validate_now(self, log: bool = True) -> dict[str, float]:
        """Score the current table on the validation seeds (VAL_SEED_OFFSET.., never evaluated; with their cond):
        ``monitor=match``: the mean squared distance of its samples to the teacher's solve from the same noises (in the
        model's own space, as the match loss); otherwise the decoded samples against the training set with the first
        feature net. Keep it when its ``monitor`` is the best so far."""
        m = self.model
        with torch.no_grad():
            table = self.sampler.frozen()
            noise = self.val_noise()
            cond = cond_of_seeds(m.cond_of, self.val_seeds(), self.device)
            x = torch.cat([sample(table, m.denoiser, nz, cond_rows(cond, slice(b, b + 500)))
                           for b, nz in zip(range(0, noise.shape[1], 500), noise.split(500, dim=1))]).cpu()
            if str(self.hparams.monitor) == "match":
                target = self._ext["val_targets"].to(x)
                if torch.isfinite(x).all():
                    x = self.in_match_space(x)
            elif m.decode is not None and torch.isfinite(x).all():
                x = decoded(m.decode, x)
        if not torch.isfinite(x).all():
            scores = {"finite": 0.0}
            score = float("inf")
        elif str(self.hparams.monitor) == "match":
            scores = {"match": float((x - target).double().pow(2).flatten(1).mean(1).mean())}
            score = scores["match"]
        else:
            scores = self._ext["judge"].score(x)
            score = scores[f"{self.hparams.monitor}_{self._ext['feature']}"]
        step = int(self.global_step)
        scores = {k: v for k, v in scores.items() if not k.startswith(("kid_se", "_"))}
        self.history["val"].append({"step": step, **scores})
        if score < float(self.best_score):
            self.best_score.fill_(score)
            self.best_step.fill_(step)
            self.best_coef.copy_(table.coef.to(self.best_coef))
            self.best_sigmas.copy_(table.sigmas.to(self.best_sigmas))
        feat = self._ext.get("feature")
        if log and "finite" not in scores and "match" in scores:
            self.log("val_match", scores["match"], prog_bar=True, on_step=True, on_epoch=False)
        elif log and "finite" not in scores:
            # on_step only: an epoch-level entry would be the mean of every validation so far
            self.log_dict({"val_kid": scores[f"kid_train_{feat}"], "val_fd": scores[f"fd_train_{feat}"]}, prog_bar=True,
                          on_step=True, on_epoch=False)
            self.log_dict(scores, prog_bar=False, on_step=True, on_epoch=False)
        return scores

    def new_history(self) -> dict[str, list]:
        return {"loss": [], "val": []}

    def on_train_start(self) -> None:
        """Validate the initial table (the first candidate), or a resumed step on the grid whose checkpoint was
        written just before its validation."""
        super().on_train_start()
        every, step = int(self.hparams.val_every), int(self.global_step)
        if every > 0 and step % every == 0 and step not in [v["step"] for v in self.history["val"]]:
            self.validate_now(log=False)  # Lightning logs this hook per epoch only; the history keeps it

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = int(self.hparams.val_every)
        step = int(self.global_step)
        if every > 0 and (step % every == 0 or step >= int(self.hparams.steps)):
            self.validate_now()

    # export ---------------------------------------------------------------------------------------
    def best_table(self) -> SolverTable:
        """The best validated table (the current one when nothing was validated)."""
        if int(self.best_step) < 0:
            return self.sampler.frozen()
        return SolverTable(self.best_sigmas.detach().cpu().clone(), self.best_coef.detach().cpu().clone())

    def loss_summary(self) -> dict[str, Any]:
        """First/last/min of the loss curve (means over windows of 10 steps) and a 50-point curve."""
        loss = np.asarray(self.history["loss"], dtype=np.float64)
        if loss.size == 0:
            return {"steps_logged": 0}
        w = max(1, min(10, loss.size // 4 or 1))
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        idx = np.unique(np.linspace(0, loss.size - 1, min(50, loss.size)).astype(int))
        return {"steps_logged": int(loss.size), "first": float(loss[:w].mean()), "last": float(loss[-w:].mean()),
                "min_smoothed": float(smooth.min()), "curve": [[int(i), float(loss[i])] for i in idx]}

    def metadata(self) -> dict[str, Any]:
        hp = self.hparams
        best = [v for v in self.history["val"] if v["step"] == int(self.best_step)]
        return {
            "format_version": FORMAT_VERSION, "method": "ddss", "family": str(hp.family), "init": str(hp.init),
            "base_solver": str(self.sampler.base_metadata.get("base_solver", hp.init)), "nfe": int(hp.nfe),
            "n_noise": self.sampler.n_noise, "objective": str(hp.loss),
            "learn_sigmas": bool(hp.learn_sigmas), "learn_noise": bool(hp.learn_noise),
            "schedule": self.sampler.base_metadata.get("schedule"), "steps": int(self.global_step),
            "best_step": int(self.best_step), "seed": int(hp.seed), "loss": self.loss_summary(),
            "world_size": int(self.trainer.world_size) if self._trainer is not None else 1,
            "selection_metrics": best[0] if best else None, "validation": self.history["val"],
            "config": {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in hp.items()},
            **self.export_metadata,
        }

    def export(self, path: str) -> str:
        """Write the best table with metadata and its plots (``<stem>-sigmas.png``, ``<stem>-coef.png``)."""
        table = self.best_table()
        table.metadata = self.metadata()
        table.save(path)
        stem = os.path.splitext(path)[0]
        plot_sigmas(self.sampler.sigma0.cpu().numpy(), table.sigmas.numpy(), f"{stem}-sigmas.png")
        plot_coef(SolverTable(self.sampler.sigma0.cpu(), self.sampler.coef0.cpu(), check=False), table, f"{stem}-coef.png")
        self.exported = path
        return path

    def on_train_end(self) -> None:
        validated = [v["step"] for v in self.history["val"]]
        if int(self.hparams.val_every) > 0 and (not validated or validated[-1] != int(self.global_step)):
            self.validate_now(log=False)  # stopped early (max_minutes) or off the validation grid: the last table competes too
        if self.export_path and self.trainer.is_global_zero:
            self.export(self.export_path)


# --- plots ---------------------------------------------------------------------------------------
def plot_coef(initial: SolverTable, learned: SolverTable, path: str) -> str:
    """Heat maps of the learned coefficient matrix and of its change from the initial table."""
    import matplotlib  # heavy, only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c1, c0 = learned.coef.numpy(), initial.coef.numpy()
    shown = c1.copy()
    shown[0] = 0.0  # row 0 is sigma_max e_0: it would swamp the colour scale
    names = learned.column_names()
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.45 * len(names) * 2), 0.4 * len(c1) + 2))
    from matplotlib.colors import SymLogNorm

    for ax, mat, title in zip(axes, [shown, c1 - c0], ["coefficients (row 0 = sigma_max e0 hidden)", "change from initial table"]):
        lim = float(np.abs(mat).max()) or 1.0
        norm = SymLogNorm(linthresh=min(1e-2, lim), vmin=-lim, vmax=lim)  # symmetric log: small entries stay visible
        im = ax.imshow(mat, cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(c1)), [f"x{i}" for i in range(len(c1) - 1)] + ["out"], fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- the command -------------------------------------------------------------------------------
def _positive(cfg: Any, key: str, kind: type = float) -> None:
    try:
        ok = kind(cfg[key]) > 0 and (kind is float or float(cfg[key]) == int(cfg[key]))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{key} must be a positive {'integer' if kind is int else 'number'}, got {cfg[key]!r}.")


def validate(cfg: Any) -> None:
    """DDSS's own checks, made before any work (called by the CLI)."""
    nfes = as_list(cfg.nfe)
    if len(nfes) != 1:
        raise ConfigError(f"ddss learns one table per run: give a single nfe (sweep with -m ddss nfe=4,5,6), got {list(nfes)}.")
    if cfg.family not in FAMILIES:
        raise ConfigError(f"unknown ddss family {cfg.family!r}; valid families: {', '.join(FAMILIES)}.")
    init = resolved_init(cfg)
    if not init.startswith(TABLE_PREFIX) and init not in INITS:
        raise ConfigError(f"ddss init must be a one-evaluation-per-step solver ({', '.join(INITS)}) or table:PATH, "
                          f"got {cfg.init!r}.")
    if cfg.family in ("ggdm", "ggdm_mc") and init != "euler":
        raise ConfigError(f"family {cfg.family} starts from DDIM (init=euler); init={cfg.init} needs family=full.")
    if str(cfg.loss) not in LOSSES:
        raise ConfigError(f"unknown ddss loss {cfg.loss!r}; valid: {', '.join(LOSSES)}.")
    against = str(cfg.get("kid_against", "data"))
    if against not in KID_AGAINST:
        raise ConfigError(f"kid_against must be one of {', '.join(KID_AGAINST)}, got {against!r}.")
    if against == "teacher" and "kid" in str(cfg.loss) and not as_list(cfg.model.get("features")):
        raise ConfigError(f"kid_against=teacher scores the teacher's solves with a feature net: model {cfg.model.name} "
                          f"needs features=[a feature-net .safetensors file or package.module:function].")
    if float(cfg.get("feature_weight", 0.0)) > 0:
        if "match" not in str(cfg.loss):
            raise ConfigError(f"feature_weight adds a feature term to the teacher match: it needs loss=match or kid+match, "
                              f"got loss={cfg.loss}.")
        if not as_list(cfg.model.get("features")) or cfg.model.features == "raw":
            raise ConfigError(f"feature_weight compares the first feature net's features: model {cfg.model.name} needs "
                              f"features=[a feature-net .safetensors file or package.module:function].")
    space = str(cfg.get("match_space", "latent"))
    if space not in MATCH_SPACES:
        raise ConfigError(f"match_space must be one of {', '.join(MATCH_SPACES)}, got {space!r}.")
    if space == "decoded" and not text_to_image(cfg.model):
        raise ConfigError("match_space=decoded compares images decoded by a VAE: it needs a latent text-to-image model "
                          "(model=diffusers with a pipeline folder); this model's samples are already images.")
    if "match" in str(cfg.loss):
        _positive(cfg, "match_weight")  # (n_match is a typed key: KEYS above)
        procs = cfg.get("devices") if isinstance(cfg.get("devices"), int) and not isinstance(cfg.get("devices"), bool) else 1
        if int(cfg.batch_size) * procs > int(cfg.n_match):
            raise ConfigError(f"batch_size ({cfg.batch_size}) cannot exceed n_match ({cfg.n_match}), the teacher pool it "
                              f"draws from" + (f", shared by {procs} processes." if procs > 1 else "."))
        try:
            check_teacher(str(cfg.teacher_solver), cfg.teacher_nfe, float(cfg.sigma_min), float(cfg.sigma_max),
                          str(cfg.teacher_grid), teacher_native(cfg))
        except ValueError as err:
            raise ConfigError(f"teacher: {err}") from None
    for key in ("steps", "batch_size", "n_val", "n", "eval_batch_size"):
        _positive(cfg, key, int)
    for key in ("lr", "sigma_lr", "sigma_data"):
        _positive(cfg, key)
    if int(cfg.batch_size) < 2 or int(cfg.n_val) < 2 or int(cfg.n) < 2:
        raise ConfigError(f"batch_size, n_val and n must be at least 2 (an unbiased MMD needs 2 samples), got "
                          f"{cfg.batch_size}, {cfg.n_val} and {cfg.n}.")
    if not 0 <= float(cfg.min_lr_ratio) <= 1:
        raise ConfigError(f"min_lr_ratio must lie in [0, 1], got {cfg.min_lr_ratio}.")
    if float(cfg.grad_clip) < 0 or int(cfg.warmup_steps) < 0 or int(cfg.val_every) < 0:
        raise ConfigError(f"grad_clip, warmup_steps and val_every must be >= 0, got {cfg.grad_clip}, {cfg.warmup_steps} "
                          f"and {cfg.val_every}.")
    if cfg.monitor not in MONITORS:
        raise ConfigError(f"unknown monitor {cfg.monitor!r}; valid: {', '.join(MONITORS)}.")
    if cfg.monitor == "match" and "match" not in str(cfg.loss):
        raise ConfigError(f"monitor=match selects by the teacher match: it needs loss=match or kid+match, got "
                          f"loss={cfg.loss}.")
    if cfg.max_minutes is not None and float(cfg.max_minutes) <= 0:
        raise ConfigError(f"max_minutes must be positive or null, got {cfg.max_minutes}.")
    compare_tables(cfg, as_list(cfg.compare), int(nfes[0]))
    try:
        initial_table(init, int(nfes[0]), bool(cfg.learn_noise), sigma_min=float(cfg.sigma_min),
                      sigma_max=float(cfg.sigma_max), schedule=str(cfg.schedule), rho=float(cfg.rho),
                      end=str(cfg.get("end", "zero")))
        baselines.build(str(cfg.ref_solver), int(cfg.ref_nfe), sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.model.features != "raw" and needs_features(cfg):
        check_features(cfg.model.features)  # classifier files or package.module:function entries
    path = resume_path(cfg.get("resume"))  # resume=true is looked up once the run folder exists
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"resume checkpoint {path} does not exist.")


def text_to_image(m: Any) -> bool:
    """Whether model config ``m`` is a text-to-image pipeline folder (``samplers.t2i.pipeline_class``; no net built)."""
    return m.kind == "diffusers" and m.get("path") not in (None, "") and pipeline_class(resolve_path(str(m.path))) is not None


def resolved_init(cfg: Any) -> str:
    """``cfg.init``, with the path of ``table:PATH`` resolved against the repository (as every path key is)."""
    init = str(cfg.init)
    return f"{TABLE_PREFIX}{resolve_path(init[len(TABLE_PREFIX):])}" if init.startswith(TABLE_PREFIX) else init


def build_module(cfg: Any) -> DDSSModule:
    """The module of a composed config (nothing attached yet)."""
    return DDSSModule(
        int(cfg.nfe), str(cfg.family), resolved_init(cfg), learn_sigmas=bool(cfg.learn_sigmas), learn_noise=bool(cfg.learn_noise),
        sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max), schedule=str(cfg.schedule), rho=float(cfg.rho),
        sigma_data=float(cfg.sigma_data), batch_size=int(cfg.batch_size), lr=float(cfg.lr), sigma_lr=float(cfg.sigma_lr),
        warmup_steps=int(cfg.warmup_steps), min_lr_ratio=float(cfg.min_lr_ratio), steps=int(cfg.steps), remat=bool(cfg.remat),
        val_every=int(cfg.val_every), n_val=int(cfg.n_val), monitor=str(cfg.monitor), seed=int(cfg.seed),
        end=str(cfg.get("end", "zero")), loss=str(cfg.loss), match_weight=float(cfg.match_weight),
        teacher_solver=str(cfg.teacher_solver), teacher_nfe=int(cfg.teacher_nfe), n_match=int(cfg.n_match),
        match_space=str(cfg.get("match_space", "latent")), teacher_grid=str(cfg.teacher_grid),
        kid_against=str(cfg.get("kid_against", "data")), feature_weight=float(cfg.get("feature_weight", 0.0)))


def _check_resume_matches(resume: Any, out_dir: str, module: DDSSModule) -> str | None:
    """The checkpoint ``resume=`` continues, or None: read with ``weights_only=True`` (a pickle that needs code is
    refused, never run) and only when its recorded settings (every hyper-parameter but ``remat``, the model and its
    fingerprint) equal this run's; otherwise one ConfigError naming the first differing key (``optimize.training.runs``)."""
    current = {**dict(module.hparams), **getattr(module, "run_settings", {})}
    return pick_resume(resume, out_dir, current, ignore=("remat",), may_be_inf=("best_score",))


def run(cfg: Any) -> dict[str, Any]:
    """`python -m optimize ddss`: train (Lightning: CSV logs, checkpoints in <out_dir>/lightning, resume), export the
    best table to ``<out_dir>/ddss-<family>-nfe<N>.safetensors`` with plots, then evaluate it next to the classic
    solvers of ``compare`` on the same seeds. Returns {"table": path, "rows": evaluation rows}."""
    if cfg.get("num_threads") is not None:
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out_dir = str(cfg.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    device = str(cfg.device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per DDP process
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    model = load_model(cfg.model, device)
    if str(cfg.init).startswith(TABLE_PREFIX):  # made for this model (at another guidance scale: model.any_guidance)?
        try:
            init_file_table(resolved_init(cfg), int(cfg.nfe), model)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    judge = Judge.for_model(cfg.model, model.shape, device, n_boot=int(cfg.n_boot))
    module = build_module(cfg).attach(model, judge if needs_features(cfg) else None, teacher_native(cfg))
    loss_tag = "" if str(cfg.loss) == "kid" else "-" + str(cfg.loss).replace("+", "-")
    module.export_path = os.path.join(out_dir, f"ddss-{cfg.family}{loss_tag}-nfe{int(cfg.nfe)}.safetensors")
    module.export_metadata = {**model.table_metadata(), "run_config": OmegaConf.to_container(cfg, resolve=True)}
    module.run_settings = {"model": str(cfg.model.name), "model_fingerprint": model.fingerprint}
    ckpt_path = _check_resume_matches(cfg.get("resume"), out_dir, module)
    parts = trainer_parts(cfg, out_dir)
    accelerator = str(cfg.accelerator) if cfg.accelerator != "auto" else ("cpu" if device == "cpu" else "auto")
    trainer = L.Trainer(accelerator=accelerator, devices=cfg.devices, strategy=str(cfg.strategy), max_steps=int(cfg.steps),
                        **parts, gradient_clip_val=float(cfg.grad_clip) or None,
                        log_every_n_steps=max(1, min(10, int(cfg.steps) // 2)), enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=out_dir,
                        enable_progress_bar=bool(cfg.progress_bar))
    n_params = module.sampler.u.numel() + (0 if module.sampler.theta is None else module.sampler.theta.numel())
    if trainer.is_global_zero:
        print(f"ddss {cfg.family} from {cfg.init}, nfe {cfg.nfe}, K={module.sampler.n_noise}, loss {cfg.loss}: {n_params} "
              f"parameters, {cfg.steps} steps of batch {cfg.batch_size} on {cfg.model.name}", flush=True)
    t0 = time.perf_counter()
    try:
        trainer.fit(module, ticks(), ckpt_path=ckpt_path,
                    weights_only=True)
    except NaNLossError as err:
        raise ConfigError(str(err)) from None
    seconds = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return {"table": module.export_path, "rows": []}
    path = module.exported or module.export(module.export_path)
    table = SolverTable.load(path, fingerprint=model.fingerprint)
    best = f"best validation at step {int(module.best_step)}" if int(module.best_step) >= 0 else "no validation: last table"
    print(f"ddss: {module.global_step} steps in {seconds:.0f} s ({best}) -> {path}", flush=True)
    labels = [("ddss", table), *compare_tables(cfg, as_list(cfg.compare), int(cfg.nfe))]
    rows = (evaluate_jobs(cfg, model, judge, [(label, t, {}) for label, t in labels], batch_size=int(cfg.eval_batch_size))
            if cfg.get("evaluate_at_end", True) else [])
    table.metadata["train_seconds"] = round(seconds, 1)
    if rows:  # the final measurement goes into the artifact too
        table.metadata["evaluation"] = {k: v for k, v in rows[0].items() if k not in ("method", "model") and not k.startswith("_")}
    table.save(path)
    return {"table": path, "rows": rows}
