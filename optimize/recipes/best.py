"""``python -m optimize best model=edm nfe=4``: the recipe that makes the shipped tables, as one command.

For each NFE: LD3 over each of ``ld3_bases`` (the chain starts from the table with the lower validation L2 of its own
fit; ``start=oss``: OSS's step search instead, the better start on the text-to-image teachers; ``start=SOLVER[:END]``:
a classic table on the run's ``schedule``, no fit; a list of starts runs a chain from each, all candidates of one
selection), IIA over that
table (``iia=false``: skipped), DDSS from it (every causal coefficient, ``ddss_loss``: KID + teacher L2, or the teacher
L2 alone; the teacher is ``teacher_solver@teacher_nfe`` on ``teacher_grid``, the same for LD3, DDSS and selection); of
the start and these, the candidate with the lowest training-set FD (first feature net) on the selection seeds 3,000,000.. (or,
``select_by=match``, the lowest mean squared distance to the teacher's solve there, which needs no data: with
``ddss_loss=match`` a text-to-image model learns from prompts alone, its selection seeds taking ``select_prompts``) is
written to the run folder as
``<model>-best-nfe<N>.safetensors`` (``ship=true``: also to checkpoints/tables), then every table of the chain is
evaluated beside the ``compare`` classics on the evaluation seeds. Each step runs ``python -m optimize`` in its own
process (``optimize.recipes``), with this run's model overrides.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from samplers import SolverTable, make_noise

from optimize.base import ConfigError, as_list, resolve_path
from optimize.base.conds import cond_of_seeds
from optimize.base.seeds import VAL_SEED_OFFSET, seed_range
from optimize.evaluation.evaluate import Judge, evaluate_jobs, load_model
from optimize.base.keys import count
from optimize.recipes import best_ld3, classic_start, fit_ddss, fit_iia, fit_ld3, fit_oss, select, ship, start_tag
from optimize.training.distill import GAP_WARN, check_teacher, teacher_gap, teacher_native, teacher_targets
from optimize.training.runs import compare_entry, compare_tables

KEYS = {"ddss_steps": count(10**6), "n_select": count(10**6, low=2)}  # this method's typed keys (optimize.base.keys)


SELECT_BY = ("fd", "match")
STARTS = ("ld3", "oss")  # the fitted starts; any other start is a classic table, SOLVER[:END] as in compare
GAP_NOISES = 8  # selection noises of the teacher convergence check


def needs_data(cfg: Any) -> bool:
    """Data and feature nets are needed unless DDSS learns by the teacher match alone and selection is by it too."""
    return "kid" in str(cfg.ddss_loss) or str(cfg.select_by) != "match"


def validate(cfg: Any) -> None:
    """The solvers of the chain and of the final comparison."""
    starts = start_names(cfg)
    if not starts or len(set(starts)) != len(starts):
        raise ConfigError(f"start must name one or more different starts, got {cfg.start!r}.")
    classic = [s for s in starts if s not in STARTS]
    try:
        compare_tables(cfg, classic, int(as_list(cfg.nfe)[0]))
    except ConfigError as err:
        raise ConfigError(f"start must be {', '.join(STARTS)} or a classic solver SOLVER[:END] (euler, unipc, "
                          f"dpmpp_2m, ...): {str(err).removeprefix('compare: ')}") from None
    if not isinstance(cfg.iia, bool):
        raise ConfigError(f"iia must be true or false, got {cfg.iia!r}.")
    if "ld3" in starts and not as_list(cfg.ld3_bases):
        raise ConfigError("ld3_bases must name at least one solver (unipc, dpmpp_2m, ...).")
    if str(cfg.ddss_loss) not in ("kid+match", "match"):
        raise ConfigError(f"ddss_loss must be kid+match or match, got {cfg.ddss_loss!r}.")
    if str(cfg.select_by) not in SELECT_BY:
        raise ConfigError(f"select_by must be one of {', '.join(SELECT_BY)}, got {cfg.select_by!r}.")
    if cfg.get("select_prompts") is not None and cfg.model.get("prompts") is None:
        raise ConfigError("select_prompts is for text-to-image models (model.prompts): this model takes no prompts.")
    try:
        check_teacher(str(cfg.teacher_solver), cfg.teacher_nfe, float(cfg.sigma_min), float(cfg.sigma_max),
                      str(cfg.teacher_grid), teacher_native(cfg))
    except ValueError as err:
        raise ConfigError(f"teacher: {err}") from None
    compare_tables(cfg, as_list(cfg.compare), int(as_list(cfg.nfe)[0]))


def start_names(cfg: Any) -> list[str]:
    """The chains' starts: ``start`` as one name or a list."""
    return [str(s) for s in as_list(cfg.start)]


def _model_overrides() -> tuple[str, ...]:
    """This run's ``model.*`` command-line overrides, passed on to each step's process."""
    try:
        task = HydraConfig.get().overrides.task
    except ValueError:  # not inside a Hydra run (called from Python)
        return ()
    return tuple(o for o in task if o.lstrip("+").startswith("model."))


def check_converged(cfg: Any, m: Any, e: Any, cond: Any, coarse: Any, native: Any) -> None:
    """Print how far the teacher solve ``coarse`` of a few selection noises ``e`` is from its 3x finer solve
    (``teacher_gap``) and warn on stderr when it is beyond ``GAP_WARN``: the learners and the selection would chase an
    unconverged target."""
    solver, nfe, grid = str(cfg.teacher_solver), int(cfg.teacher_nfe), str(cfg.teacher_grid)
    try:
        gap = teacher_gap(m.denoiser, e, solver, nfe, float(cfg.sigma_min), float(cfg.sigma_max), cond, native, coarse)
    except ValueError as err:  # 3x the NFE does not fit the native grid
        print(f"teacher check skipped: {err}", flush=True)
        return
    print(f"teacher check: {solver}@{nfe} on {grid} is {gap:.1%} (relative RMS) from the same solver at {3 * nfe} NFE "
          f"on {len(e)} selection noises", flush=True)
    if gap > GAP_WARN:
        print(f"warning: the teacher solve {solver}@{nfe} on {grid} is {gap:.0%} from a finer one, beyond "
              f"{GAP_WARN:.0%}: the tables will match an unconverged target. Raise teacher_nfe or change the grid "
              f"(a flow-matching model: teacher_solver=euler teacher_nfe=50 teacher_grid=native).", file=sys.stderr,
              flush=True)


def run(cfg: Any) -> list[str]:
    """Fit, select and evaluate at every ``nfe``; returns the paths of the picked tables."""
    device, name = str(cfg.device), str(cfg.model.name)
    out = Path(str(cfg.out_dir))
    tables, runs = out / "tables", out / "runs"
    tables.mkdir(parents=True, exist_ok=True)
    extra = _model_overrides()
    model = load_model(cfg.model, device)
    judge = Judge.for_model(cfg.model, model.shape, device, n_boot=int(cfg.n_boot))
    chooser, target, how = model, None, None
    if str(cfg.select_by) == "match":
        if cfg.get("select_prompts") is not None:  # the selection seeds' prompts (a text-to-image model)
            chooser = load_model(OmegaConf.merge(cfg.model, {"prompts": str(resolve_path(str(cfg.select_prompts)))}), device)
        seeds = seed_range(VAL_SEED_OFFSET, 0, int(cfg.n_select))
        e = make_noise(1, model.shape, seeds, dtype=model.dtype)[0]
        native = teacher_native(cfg)
        target = teacher_targets(chooser.denoiser, e, str(cfg.teacher_solver), int(cfg.teacher_nfe), float(cfg.sigma_min),
                                 float(cfg.sigma_max), cond=cond_of_seeds(chooser.cond_of, seeds), seeds=seeds,
                                 native=native)
        check_converged(cfg, chooser, e[:GAP_NOISES], cond_of_seeds(chooser.cond_of, seeds[:GAP_NOISES]),
                        target[:GAP_NOISES], native)
        how = (f"teacher match ({cfg.teacher_solver}@{cfg.teacher_nfe} on {cfg.teacher_grid}, mean squared distance), "
               f"seeds {VAL_SEED_OFFSET}.."
               + (f", prompts {cfg.select_prompts}" if cfg.get("select_prompts") is not None else ""))
    ddss_extra = tuple(str(a) for a in as_list(cfg.get("ddss_extra") or []))
    teacher = tuple(f"{key}={cfg[key]}" for key in ("teacher_solver", "teacher_nfe", "teacher_grid"))  # LD3's and DDSS's
    starts = start_names(cfg)
    picked, jobs = [], []
    nfes = [int(n) for n in as_list(cfg.nfe)]
    oss = fit_oss(name, nfes, tables, extra, runs) if "oss" in starts else {}
    for nfe in nfes:
        candidates, start_of = [], {}  # (label, table file) of every chain; the start each label's chain began from
        for i, start_name in enumerate(starts):
            if start_name == "oss":
                start = oss[nfe]
            elif start_name == "ld3":
                start = best_ld3([fit_ld3(name, nfe, str(b), tables, extra + teacher, runs) for b in as_list(cfg.ld3_bases)])
            else:
                start = classic_start(model, start_name, compare_tables(cfg, [start_name], nfe)[0][1], tables)
            # the first start's files keep the one-start names, so adding a start to an earlier run fits only its chain
            tag = None if i == 0 else start_tag(start_name)
            chain = [(f"iia({start_name})", fit_iia(name, nfe, start, tables, extra, runs, tag))] if cfg.iia else []
            chain.append((f"ddss({start_name})", fit_ddss(name, nfe, start, tables, int(cfg.ddss_steps),
                                                          extra + teacher + ddss_extra, runs, str(cfg.ddss_loss),
                                                          "match" if tag is None else f"match-{tag}")))
            own = [(start_name, start), *chain]  # the start is a candidate too: the pick never loses to it
            candidates += own
            start_of.update(dict.fromkeys((label for label, _ in own), start))
        label, path, scores = select(chooser, judge, nfe, int(cfg.n_select), candidates, target)
        data = str(cfg.model.get("data"))
        best = ship(model, name, nfe, label, path, scores, data, folder=out, selection=how, start=start_of[label],
                    n_select=int(cfg.n_select))
        if cfg.ship:
            ship(model, name, nfe, label, path, scores, data, selection=how, start=start_of[label],
                 n_select=int(cfg.n_select))
        print(f"best at nfe {nfe}: {label} ({', '.join(f'{k} {v:.4g}' for k, v in scores.items())}) -> {best}", flush=True)
        picked.append(str(best))
        chains = []
        for lab, p in candidates:  # a start is named by its method (ld3-unipc, oss) or as a compare classic
            t = SolverTable.load(str(p), fingerprint=model.fingerprint)
            if lab in starts:
                lab = str(t.metadata.get("method", lab)) if lab in STARTS else compare_entry(lab)[2]
            chains.append((lab, t, {}))
        jobs += [*chains, (f"best={label}", SolverTable.load(str(best), fingerprint=model.fingerprint), {}),
                 *[(lab, t, {}) for lab, t in compare_tables(cfg, as_list(cfg.compare), nfe)
                   if lab not in {c[0] for c in chains}]]  # a classic start that is also a compare entry: once
    if bool(cfg.get("evaluate", True)) and jobs:
        evaluate_jobs(cfg, model, judge, jobs)
    return [os.path.relpath(p) for p in picked]
