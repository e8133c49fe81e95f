"""IIA: improved integration approximation (Zhang, Lewis and Kleijn), fitted as corrections to a table.

Every state row ``r`` of a base table (a row that lands on a new step sigma, and the output row) is
replaced by ``base_r + sum_k w_k dir_k``: fixed directions in the table's column space (differences of
basis vectors the step already uses) times weights fitted by least squares so that the coarse step
lands where a fine solve lands. Fitting walks the trajectory the IIA sampler itself produces, row by
row (every trajectory is run by ``samplers.sample``: each row resumes a batch's run with a ``continuation``
table, so a sample costs the N coarse evaluations plus its fine solves), and solves, in float64,

    (A + lambda tr(A)/m I) w = c,    A = sum_s M_s^T M_s,   c = sum_s M_s^T (y_s - base_r . V_s)

with ``M_s = V_s Dir^T`` the per-sample directions and ``y_s`` the sample's target (normal equations
summed per sample, never averaged vectors). The result is an ordinary table with the base table's
sigmas and NFE: zero extra evaluations at sampling time.

Variants (``variant=``):

- ``edm`` (base ``heun``, the paper's IIA-EDM, r = 1): ``[x_p - d_p]``, ``[d_p - d(predictor)]`` of the
  current and the previous step (4 weights per step); as in the paper the first step stays plain Heun (no
  history: not fitted) and the last, Euler into sigma 0 (no predictor), gets 3;
- ``ddim`` (base ``euler``, IIA-DDIM): ``d_p - d_{p-1}`` and ``eps_p - eps_{p-1}`` with
  ``eps = (x - d) / sigma`` (2 weights);
- ``dpmpp`` (base ``dpmpp_2m``, IIA-DPM-Solver++): ``x_p`` and ``d_p`` (2 weights);
- ``generic`` (any base table): every vector the step and the previous step use, constrained to
  directions whose coefficients sum to zero (the weight on x0 stays that of the base row).

Targets (``target=``): ``step`` is the paper's: the base solver run over the step's interval with
``substeps`` uniform sub-steps from the IIA state; ``trajectory`` is the base solver's whole solve on
the grid refined ``substeps`` times, from the same initial noise, read at the coarse sigmas.

Text-to-image models: every solve of a fitting batch gives each row the cond of its seed (``Model.cond_of``, the
prompt of seed s is s mod P); models without a cond are unchanged.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Sequence

import lightning as L
import numpy as np
import torch

from samplers import SolverTable, baselines, make_noise, sample

from optimize.base import TABLE_PREFIX, ConfigError, SkipPoint, as_list, resolve_path
from optimize.evaluation.evaluate import Judge, evaluate_jobs, load_model
from optimize.evaluation.evaluate import validate as validate_evaluate
from optimize.base.keys import Key, count
from optimize.base.paths import path_inside, slug
from optimize.base.seeds import FIT_SEED_OFFSET, seed_range
from optimize.base.conds import cond_of_seeds

KEYS = {  # this method's typed keys (optimize.base.keys; shared ones are declared there)
    "substeps": count(10_000), "ridge": Key("num", 0), "n_fit": count(10**8), "fit_batch_size": count(10**6)}
VARIANTS = {"edm": "heun", "ddim": "euler", "dpmpp": "dpmpp_2m", "generic": None, "full": None, "free": None}
TARGETS = ("step", "trajectory")


# --- table structure ----------------------------------------------------------------------------
def state_rows(table: SolverTable) -> list[int]:
    """Rows holding the sampler's state: row 0, every row whose next row has a different sigma, and row N.

    For Heun (sigmas s0, s1, s1, s2, s2, ...) the predictor rows are skipped; for one-evaluation-per-step
    solvers every row is a state row.
    """
    s = table.sigmas.detach().numpy()
    n = table.nfe
    return [0] + [r for r in range(1, n) if r == n - 1 or s[r] != s[r + 1]] + [n]


def step_sigmas(table: SolverTable) -> np.ndarray:
    """The sigma of every state row except the output (the base solver's step sigmas)."""
    s = table.sigmas.detach().numpy()
    return np.array([s[r] for r in state_rows(table)[:-1]])


def solver_grid(table: SolverTable) -> tuple[np.ndarray, float]:
    """(the sigma of every state row but the output, where the last step lands): the table's ``step_sigmas`` metadata
    when it has one (learned schedules with decoupled evaluation sigmas, ``end="sigma_min"``), else its evaluation
    sigmas and 0."""
    grid = table.metadata.get("step_sigmas")
    steps = step_sigmas(table)
    if grid is not None and len(grid) == len(steps) + 1:
        return np.asarray(grid[:-1], dtype=np.float64), float(grid[-1])
    return steps, 0.0


def truncate(table: SolverTable, row: int) -> SolverTable:
    """The table that stops at ``row``: its first ``row`` evaluations, with row ``row`` as the output."""
    n, k = table.nfe, table.n_noise
    coef = table.coef.detach().numpy()
    cols = list(range(k)) + [k + j for j in range(row)] + [k + n + j for j in range(row)]
    return SolverTable(table.sigmas.detach().numpy()[:row], coef[: row + 1][:, cols], dict(table.metadata))


def continuation(table: SolverTable, start: int, stop: int) -> tuple[SolverTable, list[int]]:
    """Rows ``start..stop`` of ``table`` as a table of their own, to resume a run whose evaluations ``< start`` are known.

    Its evaluations are ``start..stop-1`` and its output is row ``stop``; its noise columns are the known vectors
    (``e``, ``x_j``, ``d_j`` with ``j < start``) those rows read, whose columns in ``table`` are returned beside it:
    ``sample(cont, D, stack(those vectors))`` continues the run exactly (``start = 0``: ``truncate(table, stop)``).
    """
    n, k = table.nfe, table.n_noise
    if not 0 <= start < stop <= n:
        raise ValueError(f"a continuation needs 0 <= start < stop <= N = {n}, got start={start}, stop={stop}.")
    coef = table.coef.detach().numpy()[start: stop + 1]
    known = list(range(k)) + [k + j for j in range(start)] + [k + n + j for j in range(start)]
    noise = [c for c in known if np.any(coef[:, c] != 0)] or [0]
    new = [k + j for j in range(start, stop)] + [k + n + j for j in range(start, stop)]
    meta = {"method": "continuation", "rows": [start, stop]}
    return SolverTable(table.sigmas.detach().numpy()[start:stop], coef[:, noise + new], meta), noise


def _build_base(name: str, sigmas: Sequence[float], config: dict[str, Any], final: float = 0.0) -> SolverTable:
    """``baselines.build(name)`` on explicit step sigmas (the NFE that gives that many steps), landing on ``final``
    (0, or a positive sigma: ``end="sigma_min"``)."""
    steps_for = baselines.SOLVERS[name][1]
    nfe = next(m for m in range(len(sigmas), 2 * len(sigmas) + 1) if steps_for(m) == len(sigmas) and (name != "heun" or m % 2))
    if final > 0:
        return baselines.build(name, nfe, sigmas=[*sigmas, final], end="sigma_min", **config)
    return baselines.build(name, nfe, sigmas=list(sigmas), **config)


def directions(table: SolverTable, row: int, prev: int, variant: str) -> np.ndarray:
    """Correction directions ``[m, K+2N]`` for state row ``row`` whose step starts at state row ``prev``."""
    n, k = table.nfe, table.n_noise
    coef = table.coef.detach().numpy()
    sig = table.sigmas.detach().numpy()
    width = k + 2 * n
    X, Dc = (lambda j: k + j), (lambda j: k + n + j)

    def vec(*terms: tuple[int, float]) -> np.ndarray:
        v = np.zeros(width)
        for c, w in terms:
            v[c] += w
        return v

    states = state_rows(table)
    before = [p for p in states if p < prev]
    pp = before[-1] if before else None  # the state the previous step started from
    dirs: list[np.ndarray] = []
    if variant == "edm":  # [x_p - d_p], [d_p - d(predictor of p)], for the current and the previous step
        for p, nxt in ((prev, row), (pp, prev)) if pp is not None else ():  # the first step stays plain Heun
            dirs.append(vec((X(p), 1.0), (Dc(p), -1.0)))
            if p + 1 < nxt:  # a predictor evaluation between p and the next state
                dirs.append(vec((Dc(p), 1.0), (Dc(p + 1), -1.0)))
    elif variant == "ddim":  # d_p - d_pp and eps_p - eps_pp
        if pp is not None:
            dirs.append(vec((Dc(prev), 1.0), (Dc(pp), -1.0)))
            dirs.append(vec((X(prev), 1 / sig[prev]), (Dc(prev), -1 / sig[prev]), (X(pp), -1 / sig[pp]), (Dc(pp), 1 / sig[pp])))
    elif variant == "dpmpp":  # f0 x_p + f1 d_p
        dirs += [vec((X(prev), 1.0)), vec((Dc(prev), 1.0))]
    elif variant == "generic":  # zero-sum combinations of what this step and the previous one use
        used = set(np.flatnonzero(coef[row, k:]) + k)
        if prev > 0:
            used |= set(np.flatnonzero(coef[prev, k:]) + k)
        used |= {X(prev), Dc(prev)}
        cols = sorted(used)
        dirs += [vec((c, 1.0), (cols[0], -1.0)) for c in cols[1:]]
    elif variant in ("full", "free"):  # every earlier input and output (full: zero-sum combinations)
        cols = [X(j) for j in range(min(row, n))] + [Dc(j) for j in range(min(row, n))]
        if variant == "full":
            dirs += [vec((c, 1.0), (cols[0], -1.0)) for c in cols[1:]]
        else:
            dirs += [vec((c, 1.0)) for c in cols]
    else:
        raise ValueError(f"unknown IIA variant {variant!r}; valid: {', '.join(VARIANTS)}.")
    return np.array(dirs).reshape(-1, width)


# --- the fitter -----------------------------------------------------------------------------------
class NormalEquations:
    """Running sums ``A = sum M^T M`` and ``c = sum M^T r`` in float64 (plus ``sum r^2`` for residuals); ``solve``
    returns the minimum-norm least-squares weights."""

    def __init__(self, m: int):
        self.A = torch.zeros((m, m), dtype=torch.float64)
        self.c = torch.zeros(m, dtype=torch.float64)
        self.rr = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def add(self, M: torch.Tensor, r: torch.Tensor) -> None:
        """Add samples: ``M [B, P, m]`` (directions evaluated per sample, P = pixels), ``r [B, P]``."""
        M, r = M.to(torch.float64).cpu(), r.to(torch.float64).cpu()
        self.A += torch.einsum("bpi,bpj->ij", M, M)
        self.c += torch.einsum("bpi,bp->i", M, r)
        self.rr += (r * r).sum()
        self.count += r.numel()

    def tensors(self) -> list[torch.Tensor]:
        return [self.A, self.c, self.rr, self.count]

    def solve(self, ridge: float = 0.0) -> tuple[torch.Tensor, float, float]:
        """Weights ``w`` and the RMS residual before and after: ``(w, rms_base, rms_fit)``."""
        m = self.A.shape[0]
        count = max(float(self.count), 1.0)
        rms_base = float(self.rr / count) ** 0.5
        if m == 0:
            return torch.zeros(0, dtype=torch.float64), rms_base, rms_base
        reg = ridge * float(torch.trace(self.A)) / m
        # Jacobi-scaled, minimum-norm solution: directions differ in scale by orders of magnitude, and can
        # coincide on a trajectory (IIA-DDIM's two on its first fitted step)
        scale = torch.diagonal(self.A).clamp_min(1e-300).rsqrt()
        A = scale[:, None] * (self.A + reg * torch.eye(m, dtype=torch.float64)) * scale[None, :]
        w = scale * (torch.linalg.pinv(A, rtol=1e-12, hermitian=True) @ (scale * self.c))
        rr_fit = self.rr - 2 * w @ self.c + w @ self.A @ w
        return w, rms_base, float(rr_fit.clamp_min(0) / count) ** 0.5


class IIAFitter:
    """The state of a fit: the table fitted so far, every batch's basis vectors, and the next row to fit.

    Drive it with ``for row in fitter.rows(): for each batch: fitter.accumulate(batch_id, noise, cond); fitter.solve()``;
    the normal equations may be summed across processes before ``solve`` (``fitter.equations.tensors()``). A batch's
    per-row ``cond`` (its seeds' ``Model.cond_of``, e.g. prompt indices) goes with its noise into every solve of that
    batch; ``cond`` of the fitter is one cond for every batch that has none (None: the model takes none).
    """

    def __init__(self, denoiser: Any, base: SolverTable, *, variant: str = "generic", target: str = "step",
                 substeps: int = 4, ridge: float = 0.0, cond: Any = None, fine_solver: str | None = None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown IIA variant {variant!r}; valid: {', '.join(VARIANTS)}.")
        if target not in TARGETS:
            raise ValueError(f"unknown IIA target {target!r}; valid: {', '.join(TARGETS)}.")
        if base.n_noise != 1:
            raise ValueError(f"IIA fits deterministic tables (K = 1); this table has K = {base.n_noise} noise vectors.")
        if int(substeps) < 1:
            raise ValueError(f"substeps must be a positive integer, got {substeps}.")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}.")
        self.base_name = str(base.metadata.get("base_solver", base.metadata.get("method", "")))
        if self.base_name not in baselines.SOLVERS:
            raise ValueError(f"IIA needs a classic base table (metadata base_solver one of {', '.join(baselines.SOLVERS)}), "
                             f"got {self.base_name!r}.")
        want = VARIANTS[variant]
        if want is not None and self.base_name != want:
            raise ValueError(f"IIA variant {variant!r} corrects {want} tables, got a {self.base_name} table (use variant=generic).")
        self.denoiser, self.base, self.cond = denoiser, base, cond
        self.variant, self.target, self.substeps, self.ridge = variant, target, int(substeps), float(ridge)
        self.config = dict(base.metadata.get("config", {}))
        self.fine_solver = fine_solver or self.base_name
        if self.fine_solver not in baselines.SOLVERS:
            raise ValueError(f"unknown fine_solver {self.fine_solver!r}; valid: {', '.join(baselines.SOLVERS)}.")
        self.fine_config = self.config if self.fine_solver == self.base_name else {}
        self.coef = base.coef.detach().numpy().copy()
        self.sig = base.sigmas.detach().numpy()
        self.states = state_rows(base)
        self.steps, self.final = solver_grid(base)
        self.batches: dict[Any, dict[str, Any]] = {}
        self.residuals: list[dict[str, float]] = []
        self._dirs: np.ndarray | None = None
        self._cont: dict[tuple[int, int], tuple[SolverTable, list[int]]] = {}
        self.equations = NormalEquations(0)

    # rows and directions
    def rows(self) -> Iterable[int]:
        """The state rows to fit, in order (rows in between are computed with base coefficients)."""
        return self.states[1:]

    def begin(self, row: int) -> None:
        """Start fitting ``row``: fix its directions and reset the normal equations."""
        prev = max(p for p in self.states if p < row)
        self._dirs = directions(self.base, row, prev, self.variant)
        self.equations = NormalEquations(len(self._dirs))
        self._prev, self._row = prev, row
        self._cont = {}  # the row's continuation tables

    # per batch: every trajectory is run by samplers.sample
    def _advance(self, b: dict[str, Any]) -> torch.Tensor:
        """Run the table fitted so far through evaluation ``row - 1`` (resumed after the batch's known evaluations),
        keeping each ``x_i``, ``d_i`` from the callback; returns the base row's value at ``row``."""
        row, k, n = self._row, 1, self.base.nfe
        start = min(b["done"], row - 1)  # a repeated call for the same row re-runs the last evaluation
        key = (start, row)
        if key not in self._cont:
            self._cont[key] = continuation(SolverTable(self.sig, self.coef, check=False), start, row)
        cont, cols = self._cont[key]
        v = b["v"]

        def keep(i: int, x: torch.Tensor, d: torch.Tensor, sigma: torch.Tensor) -> None:
            v[k + start + i], v[k + n + start + i] = x, d

        with torch.no_grad():
            base = sample(cont, self.denoiser, torch.stack([v[c] for c in cols]), b["cond"], callback=keep)
        b["done"] = row
        return base

    def _target(self, b: dict[str, Any]) -> torch.Tensor:
        """Where a fine solve lands at row ``self._row``'s sigma (0 for the output row)."""
        row, prev = self._row, self._prev
        if self.target == "trajectory":
            return b["fine"][self.states.index(row)]
        s0 = float(self.steps[self.states.index(prev)])
        s1 = float(self.steps[self.states.index(row)]) if row < self.base.nfe else self.final
        grid = np.linspace(s0, s1, self.substeps + 1)
        x0 = b["v"][1 + prev]
        if row < self.base.nfe:
            sub = _build_base(self.fine_solver, grid, self.fine_config)
            sub = truncate(sub, state_rows(sub)[self.substeps])
        else:
            sub = _build_base(self.fine_solver, grid[:-1], self.fine_config, final=s1)
        with torch.no_grad():
            return sample(sub, self.denoiser, (x0 / s0)[None], b["cond"])

    def _fine_states(self, e: torch.Tensor, cond: Any = None) -> list[torch.Tensor]:
        """The base solver on the grid refined ``substeps`` times, read at every coarse state row."""
        m = self.substeps
        grid = np.concatenate([np.linspace(a, b, m + 1)[:-1] for a, b in zip(self.steps, [*self.steps[1:], self.final])])
        fine = _build_base(self.fine_solver, grid, self.fine_config, final=self.final)
        fine_states = state_rows(fine)
        want = {fine_states[j * m]: j for j in range(len(self.steps))}
        got: dict[int, torch.Tensor] = {}

        def keep(i: int, x: torch.Tensor, d: torch.Tensor, sigma: torch.Tensor) -> None:
            if i in want:
                got[want[i]] = x.clone()

        with torch.no_grad():
            out = sample(fine, self.denoiser, e[None], cond, callback=keep)
        return [got[j] for j in range(len(self.steps))] + [out]

    def accumulate(self, batch_id: Any, e: torch.Tensor, cond: Any = None) -> None:
        """Add one batch (its initial noise ``e [B, *shape]`` and per-row ``cond``, the same on every call) to the
        current row's sums."""
        if batch_id not in self.batches:
            cond = self.cond if cond is None else cond
            # v: column -> vector (e, x_i, d_i) of the IIA trajectory; cond: the batch's rows' cond in every solve
            self.batches[batch_id] = {"v": {0: e}, "done": 0, "cond": cond}
            if self.target == "trajectory":
                self.batches[batch_id]["fine"] = self._fine_states(e, cond)
        b = self.batches[batch_id]
        base = self._advance(b)
        y = self._target(b)
        assert self._dirs is not None
        cols = sorted(set(np.flatnonzero(np.any(self._dirs != 0, axis=0))))
        r = (y - base).to(torch.float64).flatten(1)
        if not cols:
            self.equations.add(r.new_zeros((*r.shape, 0)), r)
            return
        basis = torch.stack([b["v"][c].to(torch.float64).flatten(1) for c in cols], -1)  # [B, pixels, P]
        self.equations.add(basis @ torch.as_tensor(self._dirs[:, cols].T, dtype=torch.float64), r)  # M [B, pixels, m]

    def solve(self) -> dict[str, float]:
        """Solve the current row's normal equations and write the corrected row into the table."""
        w, before, after = self.equations.solve(self.ridge)
        assert self._dirs is not None
        if len(w):
            self.coef[self._row] += w.numpy() @ self._dirs
        info = {"row": self._row, "sigma": float(self.sig[self._row]) if self._row < self.base.nfe else self.final,
                "rms_base": before, "rms_fit": after, "weights": w.tolist()}
        self.residuals.append(info)
        return info

    def table(self, metadata: dict[str, Any] | None = None) -> SolverTable:
        """The fitted table (the base table's sigmas and NFE)."""
        meta = {**self.base.metadata, "method": f"iia-{self.variant}", "base_solver": self.base_name,
                "iia": {"variant": self.variant, "target": self.target, "substeps": self.substeps, "ridge": self.ridge,
                        "fine_solver": self.fine_solver,
                        "residuals": [{k: v for k, v in r.items() if k != "weights"} for r in self.residuals]},
                **(metadata or {})}
        return SolverTable(self.sig.copy(), self.coef.copy(), meta)


def fit(denoiser: Any, base_table: SolverTable, shape: Sequence[int], n_fit: int = 512, substeps: int = 4, seed: int = 0,
        cond: Any = None, *, variant: str = "generic", target: str = "step", ridge: float = 0.0, fine_solver: str | None = None,
        batch_size: int = 512,
        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        progress: Callable[[dict[str, float]], Any] | None = None,
        cond_of: Callable[[Sequence[int]], Any] | None = None) -> SolverTable:
    """Fit IIA corrections to ``base_table`` on ``n_fit`` noises (seeds ``seed`` ..) and return the new table.

    Each noise gets its seed's cond ``cond_of(seeds)`` when given (a text-to-image model's prompt index), else the
    fixed ``cond``. One process, every batch kept in memory; ``IIAModule`` does the same fit under Lightning (DDP).
    """
    if int(n_fit) < 1:
        raise ValueError(f"n_fit must be a positive integer, got {n_fit}.")
    fitter = IIAFitter(denoiser, base_table, variant=variant, target=target, substeps=substeps, ridge=ridge, cond=cond,
                       fine_solver=fine_solver)
    seeds = list(range(int(seed), int(seed) + int(n_fit)))
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    noise = {j: make_noise(1, shape, s, dtype=dtype, device=device)[0] for j, s in enumerate(batches)}
    conds = {j: cond_of_seeds(cond_of, s, device) for j, s in enumerate(batches)}
    t0 = time.perf_counter()
    for row in fitter.rows():
        fitter.begin(row)
        for j in noise:
            fitter.accumulate(j, noise[j], conds[j])
        info = fitter.solve()
        if progress is not None:
            progress(info)
    return fitter.table({"n_fit": int(n_fit), "seed": int(seed), "fit_seconds": round(time.perf_counter() - t0, 2)})


# --- Lightning (one or many processes) ---------------------------------------------------------------
def lightning_module(fitter: IIAFitter, seeds: Sequence[int], shape: Sequence[int], batch_size: int = 512,
                     dtype: torch.dtype = torch.float32, cond_of: Callable[[Sequence[int]], Any] | None = None) -> Any:
    """A LightningModule that runs ``fitter`` with ``trainer.validate`` once per fitted row (each batch's noise with
    its seeds' ``cond_of`` when given).

    Batches of seeds are dealt round-robin to the processes; before each row is solved its normal
    equations are summed over processes (``all_reduce``), so any world size gives the same table
    (up to float64 summation order).
    """
    class IIAModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.denoiser = fitter.denoiser if isinstance(fitter.denoiser, torch.nn.Module) else None
            self.fitter = fitter
            self.batches = [list(seeds[i:i + batch_size]) for i in range(0, len(seeds), batch_size)]
            self.noise: dict[int, torch.Tensor] = {}
            self.conds: dict[int, Any] = {}

        def val_dataloader(self) -> Any:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            return torch.utils.data.DataLoader(list(range(rank, len(self.batches), world)), batch_size=None)

        def validation_step(self, batch_id: Any, batch_idx: int) -> None:
            j = int(batch_id)
            if j not in self.noise:
                self.noise[j] = make_noise(1, shape, self.batches[j], dtype=dtype, device=self.device)[0]
                self.conds[j] = cond_of_seeds(cond_of, self.batches[j], self.device)
            self.fitter.accumulate(j, self.noise[j], self.conds[j])

        def on_validation_epoch_end(self) -> None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                for t in self.fitter.equations.tensors():
                    buf = t.to(self.device)
                    torch.distributed.all_reduce(buf)
                    t.copy_(buf.cpu())
            info = self.fitter.solve()
            self.log_dict({"rms_base": info["rms_base"], "rms_fit": info["rms_fit"]}, rank_zero_only=True)

    return IIAModule()


def fit_lightning(trainer: Any, fitter: IIAFitter, seeds: Sequence[int], shape: Sequence[int], batch_size: int = 512,
                  dtype: torch.dtype = torch.float32, on_row: Callable[[dict[str, float]], Any] | None = None,
                  cond_of: Callable[[Sequence[int]], Any] | None = None) -> SolverTable:
    """Fit every row with ``trainer.validate`` (a progress bar per row; each seed's noise with its ``cond_of``, e.g.
    its prompt); returns the fitted table on every rank."""
    module = lightning_module(fitter, seeds, shape, batch_size, dtype, cond_of)
    t0 = time.perf_counter()
    for row in fitter.rows():
        fitter.begin(row)
        trainer.validate(module, verbose=False)
        if on_row is not None:
            on_row(fitter.residuals[-1])
    return fitter.table({"n_fit": len(seeds), "seed": int(seeds[0]), "fit_seconds": round(time.perf_counter() - t0, 2)})


# --- the command ----------------------------------------------------------------------------------
PAPER_VARIANT = {base: name for name, base in VARIANTS.items() if base is not None}


def resolve_variant(variant: str, base: str) -> str:
    """``auto`` -> the paper's variant for the base solver (edm/ddim/dpmpp), else generic."""
    return PAPER_VARIANT.get(base, "generic") if variant == "auto" else variant


def base_table(cfg: Any, fingerprint: str | None = None) -> SolverTable:
    """The table of ``base=table:PATH`` (e.g. an LD3 schedule), checked (and against the model ``fingerprint``)."""
    path = resolve_path(str(cfg.base)[len(TABLE_PREFIX):])
    if not path.is_file():
        raise ConfigError(f"base table file {path} does not exist.")
    try:
        return SolverTable.load(str(path), fingerprint=fingerprint)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def validate(cfg: Any) -> None:
    """IIA checks made before any work (called by the CLI)."""
    validate_evaluate(cfg)
    base = str(cfg.base)
    if base.startswith(TABLE_PREFIX):
        table = base_table(cfg)
        base = str(table.metadata.get("base_solver"))
        if table.n_noise != 1 or base not in baselines.SOLVERS or base in ("ddim", "tada"):
            raise ConfigError(f"base table {cfg.base[len(TABLE_PREFIX):]} must be a deterministic table of a classic solver "
                              f"(K = 1, metadata base_solver one of euler, heun, dpmpp_2m, dpmpp_3m, ipndm, unipc), "
                              f"got K = {table.n_noise} and base_solver {base!r}.")
        if [int(n) for n in as_list(cfg.nfe)] != [table.nfe]:
            raise ConfigError(f"base table {cfg.base[len(TABLE_PREFIX):]} has NFE {table.nfe}; set nfe={table.nfe}.")
    elif base not in baselines.SOLVERS or base in ("ddim", "tada"):
        valid = [s for s in baselines.SOLVERS if s not in ("ddim", "tada")]
        raise ConfigError(f"base must be a deterministic classic solver ({', '.join(valid)}) or table:PATH, got {base!r}.")
    variant = resolve_variant(str(cfg.variant), base)
    if variant not in VARIANTS:
        raise ConfigError(f"unknown IIA variant {cfg.variant!r}; valid: auto, {', '.join(VARIANTS)}.")
    if VARIANTS[variant] not in (None, base):
        raise ConfigError(f"IIA variant {variant!r} corrects {VARIANTS[variant]} tables, not {base} (use variant=generic).")
    if str(cfg.target) not in TARGETS:
        raise ConfigError(f"unknown IIA target {cfg.target!r}; valid: {', '.join(TARGETS)}.")
    for key in ("substeps", "n_fit", "fit_batch_size", "devices"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key} must be a positive integer, got {cfg[key]}.")
    if float(cfg.ridge) < 0:
        raise ConfigError(f"ridge must be >= 0, got {cfg.ridge}.")
    try:
        seed_range(FIT_SEED_OFFSET, int(cfg.fit_seed), int(cfg.n_fit))
    except ValueError as err:
        raise ConfigError(f"fit seeds: {err}") from None
    if cfg.fine_solver is not None and str(cfg.fine_solver) not in baselines.SOLVERS:
        raise ConfigError(f"unknown fine_solver {cfg.fine_solver!r}; valid: {', '.join(baselines.SOLVERS)}.")
    for nfe in as_list(cfg.nfe):
        try:
            baselines.check_nfe(base, nfe)
        except ValueError as err:
            raise SkipPoint(f"base {err}") from None


def run(cfg: Any) -> list[str]:
    """`python -m optimize iia`: fit, save ``<out_dir>/iia-<variant>-<model>-nfe<N>.safetensors``, evaluate it beside its base."""
    device = str(cfg.device)
    model = load_model(cfg.model, device)
    given = base_table(cfg, model.fingerprint) if str(cfg.base).startswith(TABLE_PREFIX) else None
    base_name = str(cfg.base) if given is None else str(given.metadata["base_solver"])
    variant = resolve_variant(str(cfg.variant), base_name)
    seeds = seed_range(FIT_SEED_OFFSET, int(cfg.fit_seed), int(cfg.n_fit))  # the fitting range, never evaluation seeds
    accelerator = "cpu" if device == "cpu" else "gpu"
    paths, jobs = [], []
    for nfe in as_list(cfg.nfe):
        base = given if given is not None else baselines.build(
            base_name, int(nfe), schedule=str(cfg.schedule), rho=float(cfg.rho), sigma_min=float(cfg.sigma_min),
            sigma_max=float(cfg.sigma_max), end=str(cfg.get("end", "zero")))
        base_label = base_name if given is None else slug(str(given.metadata.get("method", base_name)))  # from a file
        fitter = IIAFitter(model.denoiser, base, variant=variant, target=str(cfg.target), substeps=int(cfg.substeps),
                           ridge=float(cfg.ridge), fine_solver=None if cfg.fine_solver is None else str(cfg.fine_solver))
        trainer = L.Trainer(accelerator=accelerator, devices=int(cfg.devices), logger=False, enable_model_summary=False,
                            enable_checkpointing=False, use_distributed_sampler=False)
        print(f"iia-{variant}: fitting {len(list(fitter.rows()))} rows of {base_label} at NFE {nfe} on {len(seeds)} noises "
              f"({cfg.target} target, {cfg.substeps} sub-steps)", flush=True)

        def report(info: dict[str, float]) -> None:
            if trainer.is_global_zero:
                print(f"  row {info['row']:>3}  sigma {info['sigma']:<9.4g} rms {info['rms_base']:.4g} -> {info['rms_fit']:.4g}", flush=True)

        table = fit_lightning(trainer, fitter, seeds, model.shape, int(cfg.fit_batch_size), model.dtype, on_row=report,
                              cond_of=model.cond_of)
        table.metadata.update(model.table_metadata())
        if not trainer.is_global_zero:
            continue
        stem = f"iia-{variant}" + ("" if given is None else f"-{base_label}")
        path = path_inside(str(cfg.out_dir), f"{stem}-{model.name}-nfe{table.nfe}.safetensors")
        table.save(path)
        print(f"wrote {path} (fit {table.metadata['fit_seconds']} s)", flush=True)
        paths.append(path)
        jobs += [(base_label, base, {}), (f"iia-{variant}" + ("" if given is None else f"({base_label})"), table, {})]
    if cfg.evaluate and jobs:
        judge = Judge.for_model(cfg.model, model.shape, device, n_boot=int(cfg.n_boot))
        evaluate_jobs(cfg, model, judge, jobs)
    return paths
