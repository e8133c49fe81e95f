"""Solver tables and the single executor that runs every sampler (DESIGN.md, "The table").

A table with N denoiser evaluations and K noise vectors is ``sigmas [N]`` and ``coef [N+1, K+2N]``.
Columns are the basis ``e_0..e_{K-1}, x_0..x_{N-1}, d_0..d_{N-1}``; row i < N is the denoiser input
``x_i = sum_c coef[i, c] * basis_c`` and row N is the output. Row i may use ``x_j, d_j`` only for j < i.
``TableRun`` executes a table one row at a time (it alone combines rows and frees buffers); ``sample`` runs the whole
loop with it, and the diffusers scheduler one ``step`` per call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint as _checkpoint

from .artifact import FORMAT_NAME, TableError, atomic_save, check_readable, package_version, read_header, short_error

FORMAT_VERSION = 1
MAX_SIGMA = 1e4  # largest sigma for a model that does not state its range (beyond it float32 sampling overflows)
MAX_TABLE_SIGMA = 1e6  # largest sigma a table file may hold (zero-terminal-SNR schedules reach ~2e4)
MAX_COEF = 1e12  # largest |coefficient| a table file may hold (classic solvers stay below 1e7 up to sigma 2e4)

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Any]


def _as_float64(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value if value.requires_grad else value.detach().to("cpu", torch.float64)
    try:
        return torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise TableError(f"table {name} must be numeric ({err}).") from None


def sigma_limit(denoiser: Any) -> float:
    """The largest noise level a denoiser supports: its ``sigma_max`` attribute when it states a finite one (VP and
    diffusers models), else MAX_SIGMA."""
    hi = getattr(denoiser, "sigma_max", None)
    return float(hi) if isinstance(hi, (int, float)) and not isinstance(hi, bool) and np.isfinite(hi) else MAX_SIGMA


class SolverTable:
    """A sampler as data: evaluation ``sigmas [N]``, ``coef [N+1, K+2N]`` and JSON ``metadata``.

    Tensors that require grad are kept as they are (optimisers learn them); everything else is
    stored as float64 on the CPU. ``check=False`` skips validation (an optimiser's hot loop).
    """

    def __init__(self, sigmas: Any, coef: Any, metadata: dict | None = None, *, check: bool = True):
        self.sigmas = _as_float64(sigmas, "sigmas")
        self.coef = _as_float64(coef, "coef")
        self.metadata = dict(metadata or {})
        self._plan: _Plan | None = None
        self._plan_key: tuple[Any, ...] | None = None
        if check:
            self.validate()

    # --- shape -------------------------------------------------------------------------------
    @property
    def nfe(self) -> int:
        """N, the number of denoiser evaluations (exact)."""
        return int(self.sigmas.shape[0])

    @property
    def n_noise(self) -> int:
        """K, the number of standard-normal noise vectors per sample."""
        return int(self.coef.shape[1]) - 2 * self.nfe

    def e(self, k: int) -> int:
        """Column of noise vector ``e_k``."""
        return k

    def x(self, i: int) -> int:
        """Column of denoiser input ``x_i``."""
        return self.n_noise + i

    def d(self, i: int) -> int:
        """Column of denoiser output ``d_i``."""
        return self.n_noise + self.nfe + i

    def column_names(self) -> list[str]:
        n, k = self.nfe, self.n_noise
        return [f"e{j}" for j in range(k)] + [f"x{j}" for j in range(n)] + [f"d{j}" for j in range(n)]

    def support(self) -> np.ndarray:
        """Boolean ``[N+1, K+2N]`` mask of the nonzero coefficients."""
        return self.coef.detach().cpu().numpy() != 0

    # --- validation --------------------------------------------------------------------------
    def validate(self) -> "SolverTable":
        """Check shapes, finiteness, positive sigmas and causality; raise TableError otherwise."""
        sigmas = self.sigmas.detach().cpu().numpy()
        coef = self.coef.detach().cpu().numpy()
        if sigmas.ndim != 1 or sigmas.shape[0] < 1:
            raise TableError(f"sigmas must be a 1-D array with at least one entry, got shape {tuple(sigmas.shape)}.")
        n = sigmas.shape[0]
        if coef.ndim != 2 or coef.shape[0] != n + 1 or coef.shape[1] < 2 * n + 1:
            raise TableError(
                f"coef must have shape [N+1, K+2N] = [{n + 1}, K+{2 * n}] with K >= 1 for N = {n} sigmas, "
                f"got {tuple(coef.shape)}."
            )
        if not np.all(np.isfinite(sigmas)):
            raise TableError("sigmas contain NaN or infinite values.")
        if np.any(sigmas <= 0):
            raise TableError(f"sigmas must be positive, got minimum {sigmas.min():g}.")
        if not np.all(np.isfinite(coef)):
            bad = np.argwhere(~np.isfinite(coef))[0]
            raise TableError(f"coef contains NaN or infinite values (first at row {bad[0]}, column {bad[1]}).")
        k = coef.shape[1] - 2 * n
        for i in range(n):
            late = [j for j in range(i, n) if coef[i, k + j] != 0 or coef[i, k + n + j] != 0]
            if late:
                raise TableError(
                    f"causality violated: row {i} uses x_{late[0]} or d_{late[0]}, but row i may only use "
                    f"evaluations j < i."
                )
        return self

    def _state_key(self) -> tuple[Any, ...]:
        """Identity and in-place version counters of coef and sigmas: changes whenever either is edited or replaced.
        Inference-mode tensors have no version counter: their key holds a copy of the values instead."""
        key: list[Any] = []
        for t in (self.coef, self.sigmas):
            try:
                key += [id(t), t._version]
            except RuntimeError:  # an inference tensor
                key += [id(t), t.detach().clone()]
        return tuple(key)

    def _plan_is_current(self, key: tuple[Any, ...]) -> bool:
        old = self._plan_key
        if old is None or len(old) != len(key):
            return False
        return all(torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else
                   (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b) for a, b in zip(old, key))

    def _cached_plan(self) -> "_Plan":
        """The execution plan of the current coefficients, built once and rebuilt (after re-validation) whenever
        ``coef`` or ``sigmas`` were edited in place or replaced since: an edit never runs a stale plan."""
        key = self._state_key()
        if self._plan is None or not self._plan_is_current(key):
            if self._plan is not None:
                self.validate()  # edited after the last run: check shapes, finiteness and causality again
            coef = self.coef.detach().cpu().numpy()
            self._plan = _make_plan(self.nfe, self.n_noise, coef != 0, coef)
            self._plan_key = key
        return self._plan

    def check_values(self) -> "SolverTable":
        """What a table FILE must also satisfy (``validate`` checks only what an optimiser's tables satisfy):
        sigmas non-increasing (noise only goes down), sigmas and |coefficients| below MAX_TABLE_SIGMA and MAX_COEF."""
        sigmas = self.sigmas.detach().cpu().numpy()
        rising = np.flatnonzero(sigmas[1:] > sigmas[:-1])
        if rising.size:
            i = int(rising[0])
            raise TableError(f"sigmas must not increase, but sigma_{i + 1} = {sigmas[i + 1]:.6g} > sigma_{i} = {sigmas[i]:.6g}.")
        if sigmas[0] > MAX_TABLE_SIGMA:
            raise TableError(f"sigma_0 = {sigmas[0]:.6g} is above {MAX_TABLE_SIGMA:g}, beyond any model's noise range.")
        big = float(np.abs(self.coef.detach().cpu().numpy()).max())
        if big > MAX_COEF:
            raise TableError(f"a coefficient of magnitude {big:.3g} is above {MAX_COEF:g}; no solver needs it and "
                             f"sampling would overflow.")
        return self

    def check_for(self, denoiser: Any) -> "SolverTable":
        """The table suits ``denoiser``: its sigmas lie in the model's stated range (``sigma_min``/``sigma_max``
        attributes, relative tolerance 1e-6; else at most MAX_SIGMA), and a one-step student (``max_nfe``
        attribute, from its network config) gets a table with at most that many evaluations."""
        sigmas = self.sigmas.detach().cpu().numpy()
        hi = sigma_limit(denoiser)
        if sigmas.max() > hi * (1 + 1e-6):
            raise TableError(f"the table evaluates sigma {sigmas.max():.6g}, above the largest noise level this model "
                             f"supports ({hi:.6g}).")
        max_nfe = getattr(denoiser, "max_nfe", None)
        if isinstance(max_nfe, int) and self.nfe > max_nfe:
            raise TableError(f"this model is a {max_nfe}-step student that serves tables of at most {max_nfe} "
                             f"evaluation(s); the table has {self.nfe} (use the table shipped with the student).")
        return self

    # --- persistence (see artifact.py) -------------------------------------------------------
    def save(self, path: str) -> str:
        """Write atomically as safetensors + JSON metadata; returns the path."""
        return save_table(self, path)

    @classmethod
    def load(cls, path: str, fingerprint: str | None = None) -> "SolverTable":
        """Load and validate; with ``fingerprint`` also check the table was made for that model."""
        return load_table(path, fingerprint=fingerprint)

    def __repr__(self) -> str:
        method = self.metadata.get("method", "?")
        return f"SolverTable(method={method!r}, nfe={self.nfe}, n_noise={self.n_noise})"


# --- execution plan --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """Host-side schedule: the columns each row reads and the buffers to drop after each step."""

    columns: tuple[tuple[int, ...], ...]  # per row: nonzero columns
    weights: tuple[tuple[float, ...], ...] | None  # per row: Python floats (None when learning)
    free_after: tuple[tuple[int, ...], ...]  # per step i < N: columns whose last use is step i
    noise_used: tuple[int, ...]


def _make_plan(n: int, k: int, mask: np.ndarray, coef: np.ndarray | None) -> _Plan:
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (n + 1, k + 2 * n):
        raise TableError(f"support must have shape {(n + 1, k + 2 * n)}, got {tuple(mask.shape)}.")
    columns = tuple(tuple(int(c) for c in np.flatnonzero(mask[i])) for i in range(n + 1))
    weights = None if coef is None else tuple(tuple(float(coef[i, c]) for c in columns[i]) for i in range(n + 1))
    last = np.full(k + 2 * n, -1)
    for i, cols in enumerate(columns):
        last[list(cols)] = i
    for j in range(n):  # x_j and d_j exist from step j on
        last[k + j] = max(last[k + j], j)
        last[k + n + j] = max(last[k + n + j], j)
    free_after = [[] for _ in range(n)]
    for c in range(k + 2 * n):
        if 0 <= last[c] < n:
            free_after[last[c]].append(c)
    noise_used = tuple(c for c in range(k) if last[c] >= 0)
    return _Plan(columns, weights, tuple(tuple(f) for f in free_after), noise_used)


def _combine(bases: Sequence[torch.Tensor], weights: Sequence[Any], like: torch.Tensor) -> torch.Tensor:
    """sum_j weights[j] * bases[j]; in place on a fresh buffer when the weights are floats.

    The bases of one row must share a shape: a denoiser whose output differs from its input (a generator that
    up-samples) can only be read by rows that use its outputs alone (a 1-NFE table's output row ``d_0``)."""
    if not bases:
        return torch.zeros_like(like)
    try:
        if isinstance(weights, torch.Tensor):  # differentiable in the coefficients
            out = bases[0] * weights[0]
            for b, w in zip(bases[1:], weights[1:]):
                out = out + b * w
            return out
        out = torch.mul(bases[0], weights[0])
        for b, w in zip(bases[1:], weights[1:]):
            out.add_(b, alpha=w)
        return out
    except RuntimeError:  # the shapes are looked at only when torch refuses (no check per call in the sampling loop)
        if any(b.shape != bases[0].shape for b in bases[1:]):
            raise ValueError(f"a table row combines vectors of different shapes ({', '.join(str(list(b.shape)) for b in bases)}): "
                             f"the denoiser returns another shape than its input, so rows may use its outputs only.") from None
        raise


def _call(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
    return denoiser(x, sigma) if cond is None else denoiser(x, sigma, cond)


class TableRun:
    """One execution of a table, row by row: the only place that combines rows and decides buffer lifetimes.

    ``x = run.input(i)`` is row i's denoiser input ``x_i = sum_c coef[i, c] basis_c``; ``run.record(i, x, d)`` stores
    the evaluation ``d_i = D(x_i, sigma_i)`` (with the ``x_i`` that was evaluated) and frees every buffer no later row
    reads (the plan's ``free_after``, so memory does not grow with N); ``run.output()`` is row N. ``sample`` drives it
    over the whole loop, a diffusers scheduler one ``step`` at a time. ``noise`` is ``[K, B, *shape]`` (see make_noise)
    or a mapping ``{k: e_k}`` of the vectors known now; a row reading a vector it lacks gets it from ``draw(k)`` (a
    scheduler draws them from the pipeline's generator when first needed). ``support``: which coefficients are read
    (default: the nonzeros, planned once per table); coefficients or sigmas that require grad give tensor weights, so
    the rows are differentiable in them (``learning``).
    """

    def __init__(self, table: SolverTable, noise: torch.Tensor | Mapping[int, torch.Tensor], *,
                 support: np.ndarray | None = None):
        n, k = table.nfe, table.n_noise
        if isinstance(noise, torch.Tensor):
            if noise.ndim < 2 or noise.shape[0] != k:
                raise ValueError(
                    f"noise must have shape [K, B, ...] with K = {k} for this table, got {tuple(noise.shape)}; "
                    f"use make_noise(table, shape, seeds)."
                )
        elif not noise or any(not 0 <= c < k for c in noise):
            raise ValueError(f"noise must map noise indices in [0, {k}) to tensors, got keys {sorted(noise)}.")
        self.learning = learning = table.coef.requires_grad or table.sigmas.requires_grad
        if support is not None:
            plan = _make_plan(n, k, support, None if learning else table.coef.detach().numpy())
        elif learning:
            plan = _make_plan(n, k, table.support(), None)
        else:
            plan = table._cached_plan()
        self.plan, self.nfe, self.n_noise = plan, n, k
        self._columns, self._floats, self._free_after = plan.columns, plan.weights, plan.free_after  # hot-loop reads
        self._like = noise[0] if isinstance(noise, torch.Tensor) else next(iter(noise.values()))
        self._coef = table.coef.to(self._like.device, self._like.dtype) if plan.weights is None else None
        self._buffers: dict[int, torch.Tensor] = (
            {c: noise[c] for c in plan.noise_used} if isinstance(noise, torch.Tensor) else dict(noise))

    def weights(self, i: int) -> Any:
        """Row i's nonzero coefficients, in the order of ``bases(i)``: Python floats, or a tensor when learning."""
        return self._floats[i] if self._coef is None else self._coef[i, list(self._columns[i])]

    def bases(self, i: int, draw: Callable[[int], torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The vectors row i reads (noise it lacks comes from ``draw``, in column order)."""
        columns, buffers = self._columns[i], self._buffers
        if draw is not None:
            for c in columns:
                if c < self.n_noise and c not in buffers:
                    buffers[c] = draw(c)
        try:
            return [buffers[c] for c in columns]
        except KeyError as err:
            c = err.args[0]
            n, k = self.nfe, self.n_noise
            name = f"e_{c}" if c < k else f"x_{c - k}" if c < k + n else f"d_{c - k - n}"
            raise ValueError(f"row {i} reads {name}, which this run does not hold (record each evaluation before the "
                             f"rows that read it, and give or draw every noise vector).") from None

    def input(self, i: int, draw: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Row i < N: the denoiser input ``x_i``; row N: the output (see ``output``)."""
        return _combine(self.bases(i, draw), self.weights(i), self._like)

    def record(self, i: int, x: torch.Tensor, d: torch.Tensor) -> None:
        """Store evaluation i (its input ``x_i`` and output ``d_i``), then free what no later row reads."""
        k, buffers = self.n_noise, self._buffers
        buffers[k + i] = x
        buffers[k + self.nfe + i] = d
        for c in self._free_after[i]:
            buffers.pop(c, None)

    def output(self, draw: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Row N, the sample: call it after recording all N evaluations."""
        return self.input(self.nfe, draw)

    def held(self) -> list[int]:
        """The columns whose vectors this run holds now (its memory): noise, inputs and outputs a later row reads."""
        return sorted(self._buffers)


def sample(
    table: SolverTable,
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: Any = None,
    callback: Callback | None = None,
    *,
    support: np.ndarray | None = None,
    checkpoint: bool = False,
) -> torch.Tensor:
    """Run the table: ``x_i = coef[i] . basis`` then ``d_i = D(x_i, sigma_i)``; return row N.

    ``noise`` is ``[K, B, *shape]`` (see make_noise); the output is ``[B, *shape]`` in its dtype and
    device. ``support`` fixes which coefficients are read (default: the nonzeros, planned once per
    table); with coefficients or sigmas that require grad the result is differentiable in them, and
    ``checkpoint=True`` rematerialises each step (row combination and denoiser call) so activation
    memory does not grow with N. The rows and buffer lifetimes are ``TableRun``'s.
    """
    run = TableRun(table, noise, support=support)
    n, batch, like = table.nfe, noise.shape[1], noise[0]
    sigma_rows = table.sigmas.to(noise.device, noise.dtype)[:, None].expand(n, batch)
    sigma_rows = sigma_rows if run.learning else sigma_rows.contiguous()

    def step(weights: Any, sigma: torch.Tensor, *bases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _combine(bases, weights, like)
        return x, _call(denoiser, x, sigma, cond)

    for i in range(n):
        bases = run.bases(i)
        if checkpoint and torch.is_grad_enabled():
            x, d = _checkpoint(step, run.weights(i), sigma_rows[i], *bases, use_reentrant=False)
        else:
            x, d = step(run.weights(i), sigma_rows[i], *bases)
        if callback is not None:
            callback(i, x, d, sigma_rows[i])
        run.record(i, x, d)
    return run.output()


def first_nonfinite(table: SolverTable, denoiser: Denoiser, noise: torch.Tensor, cond: Any = None) -> tuple[str, int]:
    """Where sampling first leaves the finite numbers: (the step in words with its sigma, the first bad sample's index
    in the batch). Re-runs the table with a callback; call it only after a batch came out non-finite."""
    found: list[tuple[str, int]] = []

    def first(t: torch.Tensor) -> int:
        bad = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(1).nonzero()
        return int(bad[0, 0]) if len(bad) else 0

    def spy(i: int, x: torch.Tensor, d: torch.Tensor, sigma: torch.Tensor) -> None:
        for what, t in (("the input", x), ("the model output", d)):
            if not found and not torch.isfinite(t).all():
                found.append((f"{what} of evaluation {i} (sigma {float(sigma[0]):.4g})", first(t)))

    out = sample(table, denoiser, noise, cond=cond, callback=spy)
    return found[0] if found else (f"the output row (after all {table.nfe} evaluations)", first(out))


def make_noise(
    table: SolverTable | int,
    shape: Sequence[int],
    seeds: Iterable[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard-normal noise ``[K, B, *shape]``; sample b's K vectors come from its own seed.

    Drawn in float64 on a CPU generator per sample, so a sample never depends on batch size, device
    or rank (and float32 noise is the rounding of the float64 draw).
    """
    k = table if isinstance(table, int) else table.n_noise
    shape = tuple(int(s) for s in shape)
    draws = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        draws.append(torch.randn((k, *shape), generator=gen, dtype=torch.float64))
    if not draws:
        raise ValueError("make_noise needs at least one seed.")
    return torch.stack(draws, dim=1).to(device=device, dtype=dtype)


# --- table files (safetensors + JSON metadata; atomic writes, every failure one TableError sentence) ---
def save_table(table: SolverTable, path: str) -> str:
    """Write ``table`` to ``path``; metadata gains format_version, nfe and package_version."""
    table.validate().check_values()  # never write a file that load_table would refuse
    meta: dict[str, Any] = {**table.metadata}
    meta.update(format_version=FORMAT_VERSION, nfe=table.nfe, n_noise=table.n_noise)
    meta.setdefault("package_version", package_version())
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise TableError(f"table metadata must be JSON-serialisable ({err}).") from None
    tensors = {
        "sigmas": table.sigmas.detach().to("cpu", torch.float64).contiguous(),
        "coef": table.coef.detach().to("cpu", torch.float64).contiguous(),
    }
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "metadata": meta_json}
    return atomic_save(tensors, path, header)


TABLE_TENSORS = ("sigmas", "coef")


def check_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """sigmas and coef present and stored as float64 (what save_table writes)."""
    missing = set(TABLE_TENSORS) - set(tensors)
    if missing:
        raise TableError(f"{path}: missing tensor(s) {', '.join(sorted(missing))}.")
    for name in TABLE_TENSORS:
        dtype = tensors[name].dtype
        if dtype != torch.float64:
            raise TableError(f"{path}: tensor {name} is {str(dtype).replace('torch.', '')}; a table stores float64.")


def load_table(path: str, fingerprint: str | None = None) -> SolverTable:
    """Load and validate a table file; with ``fingerprint`` check it was made for that model."""
    check_readable(path)
    header = read_header(path)
    if header.get("format") != FORMAT_NAME:
        raise TableError(f"{path}: not a solver table (format {header.get('format')!r}, expected {FORMAT_NAME!r}).")
    version = header.get("format_version")
    if version != str(FORMAT_VERSION):
        raise TableError(
            f"{path}: table format version {version} is not supported (this package reads version {FORMAT_VERSION})."
        )
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise TableError(f"{path}: truncated or corrupt table file ({short_error(err)}).") from None
    try:
        metadata = json.loads(header.get("metadata", "{}"))
    except (json.JSONDecodeError, RecursionError) as err:
        raise TableError(f"{path}: metadata is not valid JSON ({getattr(err, 'msg', 'too deeply nested')}).") from None
    if not isinstance(metadata, dict):
        raise TableError(f"{path}: metadata must be a JSON object, got {type(metadata).__name__}.")
    check_tensors(path, tensors)
    try:
        table = SolverTable(tensors["sigmas"], tensors["coef"], metadata).check_values()
    except TableError as err:
        raise TableError(f"{path}: {err}") from None
    for key, actual in (("nfe", table.nfe), ("n_noise", table.n_noise)):
        stated = metadata.get(key)
        if stated is not None and (isinstance(stated, bool) or stated != actual):
            raise TableError(f"{path}: metadata says {key} {stated!r}, but the tensors have {key} {actual}.")
    return check_fingerprint(table, fingerprint, path)


def check_fingerprint(table: SolverTable, fingerprint: str | None, path: str) -> SolverTable:
    """``table`` when it was made for the model of ``fingerprint`` (or states none, or none is given); TableError otherwise."""
    made_for = table.metadata.get("model_fingerprint")
    if fingerprint is not None and made_for is not None and made_for != fingerprint:
        raise TableError(f"{path}: made for model fingerprint {made_for}, but the model in use has fingerprint {fingerprint}.")
    return table
