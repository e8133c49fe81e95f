"""Learned tables against every few-step peer on the tiny text-to-image teachers, on held-out prompts (issue 26).

For one teacher (``checkpoints/sd-tiny`` or ``checkpoints/sd3-tiny``) and guidance scale, the sample of evaluation
seed s (s = 0..n-1) starts from the unit latents ``make_noise`` gives that seed and gets held-out prompt ``s mod 60``.
Every row is decoded by the VAE and scored on the same seeds (paired):

- peers inside the stock pipeline (``optimize.evaluation.t2i.stock_schedulers``): DPM-Solver++(2M) with and without
  Karras sigmas, UniPC, Euler, DDIM, PNDM and Align Your Steps (SD's betas only) for the U-Net; FlowMatchEuler,
  DPM-Solver++(2M) and UniPC on flow sigmas for the flow transformer; each run's net calls are counted;
- tables (``--tables``: OSS and LD3, the learned peers; the project's own) through ``samplers.sample`` with the
  project's prompt denoiser and decoded by the same VAE (the same image as the table inside the stock pipeline, to
  float32 rounding: tests/test_t2i_scheduler.py);
- the 50-step solve of the pipeline's own scheduler (the reference; cached by ``optimize.evaluation.t2i``).

Columns: RMSE and PSNR of decoded images to the 50-step solve of the same seed; FD of decoded images against real
held-out images on both feature nets (``main`` = features-captioned-a, which learners may use; ``b``, which none
uses) with bootstrap standard errors over both sets; prompt adherence (digit, colour and background all read right
by the judge); and per row the paired difference to the best peer at the same NFE (the peer with the lowest RMSE;
``peer`` rows are every row but the ``project`` ones). Writes ``docs/results/t2i/methods-<teacher>-w<g>.csv`` and
grids ``docs/results/t2i/grid-<teacher>-w<g>-nfe<N>.png`` (rows: methods, columns: seeds 0..7), then renders
``docs/results-t2i.md`` from every such CSV; each main section (not a side study) ends with the issue's goals per NFE
(``goal_lines``). ``--update`` rescores a refitted table in an existing section without sampling every stock peer
again: only what the section's figures depend on (``update_plan``, and the stock peers ``--peers`` names) is scored,
and merged.

    python scripts/results_t2i.py --teacher sd-tiny --tables docs/results/t2i/tables/sd-tiny-*.safetensors
    python scripts/results_t2i.py --teacher sd3-tiny --update --nfe 4 --tables checkpoints/tables/sd3-tiny-best-nfe4.safetensors
    python scripts/results_t2i.py --teacher sd3-tiny --update --nfe 8 --peers FlowMatchEuler  # pair a kept peer too
    python scripts/results_t2i.py --render-only
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from samplers import SolverTable, TableError, make_noise
from samplers.images import write_png_grid
from samplers.t2i import prompt_indices, read_prompts

from optimize.base import REPO, TABLE_PREFIX, repo_relative
from optimize.base.seeds import EVAL_SEED_OFFSET, seed_range
from optimize.data import captioned as cap
from optimize.data.models import load_model
from optimize.evaluation import metrics, t2i
from optimize.evaluation.classifier import load_classifier
from optimize.evaluation.evaluate import decoded, draw
from optimize.evaluation.judge import Judge
from optimize.evaluation.results import paired, verdict, write_csv
from optimize.recipes import table_hash

OUT = REPO / "docs" / "results" / "t2i"
PAGE = REPO / "docs" / "results-t2i.md"
PROMPTS = REPO / "conf" / "prompts" / "captioned-heldout.txt"
FEATURES = [str(REPO / "checkpoints" / "features-captioned-a.safetensors"),
            str(REPO / "checkpoints" / "features-captioned-b.safetensors")]
JUDGE = REPO / "checkpoints" / "features-captioned-judge.safetensors"
SHIPPED = REPO / "checkpoints" / "tables"  # the tables the project ships (``shipped_rank``)
GRID_NFE = (4, 8)
GRID_SEEDS = 8
GOAL_NFE = (4, 5, 6, 8)  # the goals hold at every NFE 4-8 the tables ship at ...
GOAL_GUIDANCE = 7.5  # ... at the guidance scale they are stated at (a side study at it is judged too)
PROJECT = ("best", "iia", "ddss")  # table methods that are the project's own; every other row is a peer


def table_images(model: Any, table: SolverTable, seeds: list[int], batch: int) -> torch.Tensor:
    """Decoded images in [-1, 1] of ``table`` run by ``samplers.sample`` from the seeds' noises and prompts."""
    x = draw(table, model.denoiser, model.shape, seeds, model.dtype, batch_size=batch, cond_of=model.cond_of)
    return decoded(model.decode, x, batch).clamp(-1, 1)


def cached(folder: Path, stem: str, n: int, key: str, compute: Any) -> torch.Tensor:
    """Decoded images kept in ``folder/<stem>-n<n>-<key>.safetensors`` so a rerun with more tables scores the peers
    without sampling them again (stem: teacher and guidance; key: the method or table hash and NFE). A file of a larger
    n serves its first n images: seeds 0..n-1 and their prompts are the start of the longer run's (as the 50-step
    references, ``t2i.reference_images``); the largest smaller one is extended, ``compute(lo)`` giving the images of
    samples lo..n-1 only (``t2i.prefix_cached``; a file's name says which run it holds)."""
    files = [f for f in folder.glob(f"{stem}-n*-{key}.safetensors")  # the n of the name a number: not another key's
             if f.name.removeprefix(f"{stem}-n").removesuffix(f"-{key}.safetensors").isdigit()]
    return t2i.prefix_cached(folder / f"{stem}-n{n}-{key}.safetensors", files, n, lambda got: len(got["images"]), compute)


def table_label(path: Path, table: SolverTable, guidance: float | None = None) -> str:
    """A row's method name: ``best`` for a shipped best table, else the table's ``method`` (with its base solver for
    LD3, its classic start, that start's grid when not Karras and its end when not zero for DDSS), e.g. ``ld3-unipc``,
    ``oss``, ``ddss (from unipc, flow, to sigma_min)``; `` (learned at w7.5)`` when it was learned at another scale than
    ``guidance``."""
    if "shipped_as" in table.metadata:
        name = f"best ({table.metadata.get('selected', '?')})"
        if path.stem != table.metadata["shipped_as"]:  # a best run kept beside the shipped one (e.g. a cheaper recipe)
            name += f" [{path.stem}]"
    else:
        method = str(table.metadata.get("method", path.stem))
        base = table.metadata.get("base_solver")
        name = f"{method}-{base}" if method == "ld3" and base else method
        config = table.metadata.get("config") or {}
        if config.get("match_space", "latent") != "latent":  # DDSS fitted in the VAE's image space
            name += f" ({config['match_space']} match)"
        if "kid" in str(config.get("loss", "")):  # DDSS with a KID loss (the training images, or the teacher's solves)
            weight = f", match_weight {float(config['match_weight']):g}" if "match" in config["loss"] else ""
            against = " against the teacher" if config.get("kid_against", "data") == "teacher" else ""
            name += f" ({config['loss']} loss{against}{weight})"
        if float(config.get("feature_weight", 0) or 0) > 0:  # DDSS's match with the first feature net's term beside it
            name += f" (feature match, feature_weight {float(config['feature_weight']):g})"
        init = table.metadata.get("init")
        if method == "ddss" and init and not str(init).startswith(TABLE_PREFIX):  # DDSS from a classic, not from a learned table
            grid = config.get("schedule", "karras")  # the classic's grid when not Karras's, e.g. (from unipc, flow)
            start = init if grid == "karras" else f"{init}, {grid}"
            end = ", to sigma_min" if config.get("end", "zero") == "sigma_min" else ""  # its last step lands there
            name += f" (from {start}{end})"
    learned = table.metadata.get("guidance")
    if guidance is not None and learned is not None and float(learned) != float(guidance):
        name += f" (learned at w{float(learned):g})"
    return name


def teacher_reference(judge: Judge, ref: torch.Tensor) -> metrics.FDReference:
    """The 50-step solve's images as the reference of an FD on net b (``fd_teacher_b``): row i shares seed i with
    every scored set, so the bootstrap resamples seeds, both sets together (``FDReference.of(same_seeds=True)``)."""
    return metrics.FDReference.of(judge.feats("b", ref.clamp(-1, 1)), judge.n_boot, judge.boot_seed, same_seeds=True)


def score(name: str, kind: str, nfe: int, x: torch.Tensor, ref: torch.Tensor, judge: Judge, judge_net: Any,
          labels: torch.Tensor, teacher: metrics.FDReference) -> dict[str, Any]:
    """One CSV row with the per-sample values kept (``_``-prefixed) for paired differences. Beside the FDs to real
    images, ``fd_teacher_b``: the FD on net b to the 50-step solve's images of the same seeds (``teacher``), the
    distance to the converged teacher's distribution, where FD to data cannot rank samplers (the teacher's own FD to
    data is not the lowest)."""
    hits = t2i.adherence(judge_net, x, labels)
    n = len(hits)
    row = {"method": name, "kind": kind, "nfe": nfe, **metrics.distance(x, ref), **judge.score(x),
           "adherence": float(hits.mean()), "adherence_se": float(hits.std() / n**0.5), "_hits": hits,
           "_images": x[:GRID_SEEDS]}
    to_teacher = metrics.fd_estimate(judge.feats("b", x.clamp(-1, 1)), teacher, seed=judge.boot_seed)
    row["fd_teacher_b"], row["fd_se_teacher_b"] = to_teacher.value, to_teacher.se
    row["_estimates"]["fd_teacher_b"] = to_teacher
    return row


def paired_to(r: dict[str, Any], other: dict[str, Any], tag: str, fds: tuple[str, ...]) -> None:
    """``r``'s paired differences to ``other`` on the same seeds, as ``d<measure>_vs_<tag>`` (and ``_se``): RMSE, the
    FDs in ``fds``, adherence."""
    r[f"drmse_vs_{tag}"], r[f"drmse_vs_{tag}_se"] = metrics.paired_mean(r["_rmse"], other["_rmse"])
    for key in fds:
        r[f"d{key}_vs_{tag}"], r[f"d{key}_vs_{tag}_se"] = paired(r, other, key)
    r[f"dadherence_vs_{tag}"], r[f"dadherence_vs_{tag}_se"] = metrics.paired_mean(r["_hits"], other["_hits"])


def shipped_rank(path: Path, meta: dict[str, Any], guidance: float) -> int:
    """How a table file stands as the one shipped for ``guidance`` (``add_paired`` pairs every row with the highest):
    2 for a file in checkpoints/tables learned at that scale (``sd-tiny-w3-nfe4`` at 3, ``sd-tiny-best-nfe4`` at 7.5),
    1 for the shipped best file of another scale (``shipped_as``; at 10, where no table was learned), 0 else (a copy
    beside it, a peer, a study's table)."""
    shipped_file = path.resolve().parent == SHIPPED.resolve()
    if shipped_file and meta.get("guidance") is not None and float(meta["guidance"]) == guidance:
        return 2
    return int(shipped_file and path.stem == meta.get("shipped_as"))


def add_paired(rows: list[dict[str, Any]]) -> None:
    """Per NFE: the best peer (lowest RMSE), and every row's paired difference to it (RMSE, FD on both nets,
    adherence); ``best_peer`` names it. Every other row (the peers for the goals, a side study's other project rows)
    is also paired against the table shipped for this scale at that NFE (the highest ``_shipped``: ``shipped_rank``;
    ``shipped`` names it, on the shipped row too). Every row's adherence and FD b paired against the 50-step solve's
    (``d<measure>_vs_teacher``: the moonshot, and the goals' "be where a peer within noise of the teacher is"), and the
    project's NFE-5 rows against the best peer at NFE 10 where that was scored (``d<measure>_vs_peer10``, ``peer10``
    names it)."""
    ref = next((r for r in rows if r["kind"] == "reference"), None)
    if ref is not None:
        for r in rows:
            if r is not ref:
                r["dadherence_vs_teacher"], r["dadherence_vs_teacher_se"] = metrics.paired_mean(r["_hits"], ref["_hits"])
                r["dfd_heldout_b_vs_teacher"], r["dfd_heldout_b_vs_teacher_se"] = paired(r, ref, "fd_heldout_b")
    peers10 = [r for r in rows if r["nfe"] == 10 and r["kind"] == "peer"]
    if peers10:
        best10 = min(peers10, key=lambda r: r["rmse"])
        for r in (r for r in rows if r["nfe"] == 5 and r["kind"] == "project"):
            r["peer10"] = best10["method"]
            paired_to(r, best10, "peer10", ("fd_heldout_b",))
    for nfe in sorted({r["nfe"] for r in rows if r["kind"] != "reference"}):
        at = [r for r in rows if r["nfe"] == nfe and r["kind"] != "reference"]
        peers = [r for r in at if r["kind"] == "peer"]
        if not peers:
            continue
        best = min(peers, key=lambda r: r["rmse"])
        for r in at:
            r["best_peer"] = best["method"]
            paired_to(r, best, "peer", ("fd_heldout_main", "fd_heldout_b", "fd_teacher_b"))
        shipped = max((r for r in at if r.get("_shipped")), key=lambda r: r["_shipped"], default=None)
        for r in at if shipped is not None else ():
            r["shipped"] = shipped["method"]
            if r is not shipped:
                paired_to(r, shipped, "shipped", ("fd_heldout_b", "fd_teacher_b"))


def mark_checked(rows: list[dict[str, Any]], guidance: float) -> None:
    """Ship what works across scales: a shipped table (``shipped_as``) scored here at ``guidance`` gets the scale added
    to its ``checked_guidance`` (accepted there by the runtime without --any-guidance) when its RMSE to the 50-step
    solve beats the best peer's beyond two paired standard errors, else the scale is removed from that list."""
    for r in rows:
        if r["kind"] != "project" or not r.get("table"):
            continue
        file = row_source(r)
        table = SolverTable.load(str(file))
        if "shipped_as" not in table.metadata:
            continue
        checked = {float(w) for w in table.metadata.get("checked_guidance") or [float(table.metadata["guidance"])]}
        wins = r["drmse_vs_peer"] + 2 * r["drmse_vs_peer_se"] < 0
        checked = checked | {guidance} if wins else checked - {guidance}
        if table.metadata.get("checked_guidance") != sorted(checked):  # an unchanged file is not rewritten
            table.metadata["checked_guidance"] = sorted(checked)
            table.save(str(file))
        print(f"{file.name}: guidance {guidance:g} {'checked' if wins else 'not shipped'} "
              f"(RMSE vs {r['best_peer']}: {r['drmse_vs_peer']:+.4f} ± {r['drmse_vs_peer_se']:.4f}); "
              f"checked_guidance {table.metadata['checked_guidance']}")


def write_grids(rows: list[dict[str, Any]], stem: str, out: Path) -> None:
    """One PNG per NFE in GRID_NFE: a row of the first GRID_SEEDS samples per method (the reference first)."""
    ref = [r for r in rows if r["kind"] == "reference"]
    for nfe in GRID_NFE:
        at = [r for r in rows if r["nfe"] == nfe]
        if at:
            images = torch.cat([r["_images"] for r in ref + at])
            write_png_grid(images, str(out / f"grid-{stem}-nfe{nfe}.png"), nrow=GRID_SEEDS, scale=2)
            print(f"grid rows ({out / f'grid-{stem}-nfe{nfe}.png'}): {', '.join(r['method'] for r in ref + at)}")


def cache_stem(args: argparse.Namespace) -> str:
    """``<teacher>-w<guidance>``: the cached images' stem (they do not depend on the study they are scored in)."""
    return f"{args.teacher}-w{args.guidance:g}"


def section_stem(args: argparse.Namespace) -> str:
    """A section's file stem: ``cache_stem`` and ``-<study>`` for a side study."""
    return f"{cache_stem(args)}-{args.study}" if args.study else cache_stem(args)


def read_section(path: Path) -> list[dict[str, Any]]:
    """An existing section's rows (``methods-*.csv``), NFE as a number."""
    rows: list[dict[str, Any]] = list(csv.DictReader(path.open()))
    for r in rows:
        r["nfe"] = int(r["nfe"])
    return rows


def row_source(r: dict[str, Any]) -> str | Path:
    """What a section's row was scored from: its table file (``table``, repo-relative or absolute) or, for a stock
    peer, its label."""
    return REPO / r["table"] if r.get("table") else r["method"]


def update_plan(section: list[dict[str, Any]], nfes: list[int], peers: list[str] | None = None) -> dict[int, list[str | Path]]:
    """What ``--update`` scores again of an existing section, per NFE: at each NFE asked for, its best peer (a stock
    label or a table file), every row paired against the shipped table (the project's, and peers paired for the
    goals: the shipped file may have changed), the stock ``peers`` named (to pair them with the shipped table and the
    50-step solve); at NFE 10 the best peer when an NFE-5 row was paired against it (``peer10``). The other peers keep
    their rows: neither their figures nor their differences to the best peer depend on what is scored again."""
    plan: dict[int, list[str | Path]] = {}
    for nfe in nfes:
        at = [r for r in section if r["nfe"] == nfe and r["kind"] != "reference"]
        best = {r["method"] for r in at if r.get("best_peer") == r["method"]}
        plan[nfe] = [row_source(r) for r in at if r["method"] in best or r["kind"] == "project"
                     or r.get("dfd_heldout_b_vs_shipped", "") != ""]
        plan[nfe] += [p for p in peers or [] if p not in plan[nfe]]
    peer10 = {r["peer10"] for r in section if r["nfe"] == 5 and r.get("peer10")}
    if 5 in nfes and peer10:
        plan.setdefault(10, []).extend(row_source(r) for r in section if r["nfe"] == 10 and r["method"] in peer10)
    return plan


def merge_section(section: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``section`` with each row scored again replaced (same NFE and table file, or same stock peer) and the rows of
    tables it did not hold put after the last row of their NFE; its reference row is kept."""
    def key(r: dict[str, Any]) -> tuple[int, str]:
        return r["nfe"], str(r.get("table") or r["method"])

    new = {key(r): r for r in fresh if r["kind"] != "reference"}
    merged = [new.pop(key(r), r) for r in section]
    for r in new.values():
        at = [i for i, m in enumerate(merged) if m["nfe"] == r["nfe"]]
        merged.insert(at[-1] + 1 if at else len(merged), r)
    return merged


def run(args: argparse.Namespace, fail: Any) -> None:
    """Score the peers and ``args.tables`` (or with ``args.update``, what ``update_plan`` names of the existing
    section, merged back into it) and write the section's CSV and grids; ``fail(message)`` for a bad argument found
    once the pipeline is loaded, before any sampling."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    prompts_all = read_prompts(str(PROMPTS))
    seeds = seed_range(EVAL_SEED_OFFSET, 0, args.n)
    prompts = [prompts_all[i] for i in prompt_indices(seeds, len(prompts_all)).tolist()]
    labels = torch.tensor([cap.parse_caption(p) for p in prompts])
    judge = Judge.for_model(OmegaConf.create({"name": "captioned", "data": "captioned-digits", "features": FEATURES,
                                             "clip": True}), (3, 32, 32), n_boot=args.n_boot)
    judge_net = load_classifier(str(JUDGE))
    folder = args.root / args.teacher
    pipe = t2i.pipeline(folder)
    peers = t2i.stock_schedulers(pipe)
    unknown = [p for p in args.peers or [] if p not in peers]
    if unknown:
        fail(f"--peers: no stock peer {unknown[0]!r} for {args.teacher}; choose from {', '.join(peers)}")
    stem = section_stem(args)
    section = read_section(args.out / f"methods-{stem}.csv") if args.update else []
    plan: dict[int, list[str | Path]] = (update_plan(section, args.nfe, args.peers) if args.update else
                                         {nfe: list(peers) if args.peers is None else list(args.peers) for nfe in args.nfe})
    for path in args.tables:  # a table at an NFE not asked for is not scored; one the plan holds is not scored twice
        nfe = SolverTable.load(str(path)).nfe
        if nfe in args.nfe and path.resolve() not in {p.resolve() for p in plan.get(nfe, []) if isinstance(p, Path)}:
            plan.setdefault(nfe, []).append(path)
    model = load_model(OmegaConf.create({"name": args.teacher, "kind": "diffusers", "path": str(folder),
                                         "prompts": str(PROMPTS), "guidance": args.guidance, "dtype": "float32"}))
    latents = make_noise(1, t2i.latent_shape(pipe), seeds)[0]

    def images(source: str | Path, nfe: int, n: int) -> torch.Tensor:
        """Decoded images of samples 0..n-1 of a stock peer (its label) or a table file, from the cache when there."""
        if isinstance(source, str):
            sched, call = peers[source](nfe)

            def stock(lo: int) -> torch.Tensor:
                x, calls = t2i.pipeline_images(pipe, sched, prompts[lo:n], latents[lo:n], args.guidance, args.batch,
                                               **call)
                if calls != nfe:
                    raise RuntimeError(f"{source} at NFE {nfe} called the net {calls} times")
                return x

            slug = "".join(c if c.isalnum() else "-" for c in source)
            return cached(args.cache, cache_stem(args), n, f"{slug}-nfe{nfe}", stock)
        table = SolverTable.load(str(source))
        return cached(args.cache, cache_stem(args), n, f"table-{table_hash(table)}",
                      lambda lo: table_images(model, table, seeds[lo:n], args.batch))

    ref = t2i.reference_images(pipe, args.teacher, prompts, latents, args.guidance, args.batch, args.cache)
    teacher = teacher_reference(judge, ref)
    rows = [score(f"{type(pipe.scheduler).__name__}, {t2i.REFERENCE_STEPS} steps", "reference", t2i.REFERENCE_STEPS,
                  ref, ref, judge, judge_net, labels, teacher)]
    for key in ("rmse", "rmse_se", "psnr", "psnr_se", "fd_teacher_b", "fd_se_teacher_b"):  # its distance to itself says nothing
        rows[0].pop(key)
    for nfe in sorted(plan):
        for source in plan[nfe]:
            x = images(source, nfe, args.n)
            if isinstance(source, str):
                rows.append(score(source, "peer", nfe, x, ref, judge, judge_net, labels, teacher))
            else:
                table = SolverTable.load(str(source))
                if table.metadata.get("guidance") is not None and float(table.metadata["guidance"]) != args.guidance:
                    print(f"note: {source.name} was learned at guidance {table.metadata['guidance']}, run at {args.guidance}")
                name = table_label(source, table, args.guidance)
                if any(r["method"] == name for r in rows if r["nfe"] == nfe):  # two fits of one recipe: name the later by file
                    name += f" [{source.stem}]"
                kind = "project" if name.split("-")[0].split(" ")[0] in PROJECT else "peer"
                rows.append(score(name, kind, nfe, x, ref, judge, judge_net, labels, teacher))
                meta = table.metadata
                rows[-1]["fit_seconds"] = meta.get("chain_fit_seconds", meta.get("fit_seconds", meta.get("train_seconds")))
                rows[-1]["table"] = repo_relative(source)
                rows[-1]["_shipped"] = shipped_rank(source, meta, args.guidance)
            print(f"{args.teacher} {rows[-1]['method']} NFE {nfe}: RMSE {rows[-1]['rmse']:.4f}, "
                  f"adherence {rows[-1]['adherence']:.3f}", flush=True)
    add_paired(rows)
    if args.update:
        was = {r["nfe"]: r["best_peer"] for r in section if r.get("best_peer")}
        now = {r["nfe"]: r["best_peer"] for r in rows if r.get("best_peer")}
        changed = [nfe for nfe in now if now[nfe] != was.get(nfe)]
        if changed:
            raise SystemExit(f"error: --update: the best peer at NFE {changed[0]} is now {now[changed[0]]}, was "
                             f"{was.get(changed[0])}: the kept rows' differences are stale; score the whole section")
    if args.mark_checked:
        mark_checked(rows, args.guidance)
    if args.update:
        next(r for r in section if r["kind"] == "reference")["_images"] = ref[:GRID_SEEDS]
        rows = merge_section(section, rows)
        for r in rows:  # kept rows at a grid's NFE: only their grid seeds are sampled
            if "_images" not in r and r["nfe"] in GRID_NFE:
                r["_images"] = images(row_source(r), r["nfe"], GRID_SEEDS)
    args.out.mkdir(parents=True, exist_ok=True)
    write_grids(rows, stem, args.out)
    for r in rows:
        r.update(teacher=args.teacher, guidance=args.guidance, n=args.n, study=args.study or "")
    write_csv([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], str(args.out / f"methods-{stem}.csv"))
    print(f"wrote {args.out / f'methods-{stem}.csv'}")


def _f(row: dict[str, str], key: str, digits: int = 3) -> str:
    v = row.get(key, "")
    return "" if v in ("", None) else f"{float(v):.{digits}f}"


def _pm(row: dict[str, str], key: str, se: str, digits: int = 3) -> str:
    return f"{_f(row, key, digits)} ± {_f(row, se, digits)}" if row.get(key, "") != "" else ""


def teacher_section(out: Path) -> list[str]:
    """The teachers at 50 steps (``teachers.csv``, scripts/results_t2i_teachers.py) and the judge (``judge.csv``)."""
    lines: list[str] = []
    judge = out / "judge.csv"
    if judge.is_file():
        lines += ["## The judge", "", "Accuracy of the prompt-adherence judge on real held-out images (`judge.csv`, "
                  "`scripts/train_captioned_judges.py`):", "",
                  *_csv_table(list(csv.DictReader(judge.open()))), ""]
    teachers = out / "teachers.csv"
    if teachers.is_file():
        lines += ["## The teachers at 50 steps", "", "Held-out prompts, the pipeline's own scheduler (`teachers.csv`, "
                  "`scripts/results_t2i_teachers.py`; grids `results/t2i/grid-<teacher>-w<scale>.png`). `all`: digit, "
                  "colour and background all read right.", "",
                  *_csv_table(list(csv.DictReader(teachers.open()))), ""]
    return lines


def _csv_table(rows: list[dict[str, str]]) -> list[str]:
    """A CSV's rows as a markdown table, numbers to 4 significant digits."""
    if not rows:
        return []

    def cell(v: str) -> str:
        try:
            return f"{float(v):.4g}"
        except ValueError:
            return v

    keys = list(rows[0])
    return ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys),
            *["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]]


def solver_section(out: Path) -> list[str]:
    """The page's first section, from ``solvers.csv`` (scripts/results_t2i_solvers.py): the stock few-step scheduler
    against the 50-step solve, and the real-vs-real floor."""
    path = out / "solvers.csv"
    if not path.is_file():
        return []
    rows = list(csv.DictReader(path.open()))
    real = next((r for r in rows if r["teacher"] == "real"), None)
    lines = ["## Does sampling matter on these teachers?", "",
             "The stock few-step scheduler of each pipeline against its own 50-step solve (`solvers.csv`, "
             "`scripts/results_t2i_solvers.py`, guidance 7.5). `Δ vs 50`: paired difference on the same seeds "
             "(± one standard error)."]
    if real is not None:
        main, b = _pm(real, "fd_heldout_main", "fd_se_heldout_main", 1), _pm(real, "fd_heldout_b", "fd_se_heldout_b", 1)
        lines += ["", f"Floor: a second draw of real held-out images scores FD main {main}, FD b {b}, adherence "
                  f"{_f(real, 'adherence')}."]
    lines += ["", "| teacher | scheduler | NFE | RMSE to 50 steps | PSNR | FD main | Δ FD main vs 50 | FD b | Δ FD b vs 50 "
              "| adherence | Δ adherence vs 50 |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["teacher"] == "real":
            continue
        lines.append(f"| {r['teacher']} | {r['scheduler']} | {r['nfe']} | {_pm(r, 'rmse', 'rmse_se', 4)} | "
                     f"{_f(r, 'psnr', 2)} | {_pm(r, 'fd_heldout_main', 'fd_se_heldout_main', 1)} | "
                     f"{_pm(r, 'dfd_heldout_main_vs_50', 'dfd_heldout_main_vs_50_se', 1)} | "
                     f"{_pm(r, 'fd_heldout_b', 'fd_se_heldout_b', 1)} | "
                     f"{_pm(r, 'dfd_heldout_b_vs_50', 'dfd_heldout_b_vs_50_se', 1)} | {_pm(r, 'adherence', 'adherence_se')} | "
                     f"{_pm(r, 'dadherence_vs_50', 'dadherence_vs_50_se')} |")
    return lines + [""]


def cost_section(out: Path) -> list[str]:
    """The recipe's fit cost: measured CPU seconds and counted evaluations (``fit-cost-<teacher>.csv``,
    scripts/t2i_fit_cost.py), with its SD 1.5 GPU estimate."""
    lines: list[str] = []
    for path in sorted(out.glob("fit-cost-*.csv")):
        rows = list(csv.DictReader(path.open()))
        if not rows:
            continue
        rate = rows[0]["assumed_sd15_evals_per_s"]
        lines += [f"## What the recipe costs ({rows[0]['teacher']})", "",
                  "`python -m optimize best start=... iia=false ddss_loss=match select_by=match ...` per NFE "
                  f"(`{path.name}`, `scripts/t2i_fit_cost.py`): wall seconds measured on this machine's 2 CPU cores "
                  "(shared with other jobs while they ran), and the guided denoiser evaluations the chain needs, "
                  "counted from its settings (OSS's search where the chain started from OSS, none from a classic start "
                  "such as `euler:sigma_min`; a table picked among several starts counts its own chain; DDSS's teacher "
                  "pool, training steps at 3 evaluations each "
                  "for the rematerialised backward pass, validations; the selection). The last column is an ESTIMATE "
                  f"for Stable Diffusion 1.5 at 512x512 on one GPU: the count over an assumed {float(rate):g} guided "
                  "evaluations per second (fp16, A100-class, batched); no GPU was lent to measure it.", "",
                  "| NFE | pick | OSS s | DDSS s | chain s | evaluations | SD 1.5 GPU minutes (estimate) |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            name = Path(r.get("table") or "").stem
            pick = r["selected"] if not name or name == f"{r['teacher']}-best-nfe{r['nfe']}" else f"{r['selected']} ({name})"
            lines.append(f"| {r['nfe']} | {pick} | {_f(r, 'cpu_seconds_oss', 0)} | {_f(r, 'cpu_seconds_ddss', 0)} "
                         f"| {_f(r, 'cpu_seconds_chain', 0)} | {float(r['total_evals']):,.0f} | "
                         f"{_f(r, 'sd15_gpu_minutes_estimate', 0)} |")
        lines.append("")
    return lines


def moonshot_lines(rows: list[dict[str, str]]) -> list[str]:
    """The issue's two moonshots for one CSV, from its paired columns: the project's NFE-4 rows' adherence against the
    50-step solve's (met when within noise), and its NFE-5 rows against the best peer at NFE 10 (met when neither RMSE
    nor FD b is worse beyond two standard errors)."""
    def judged(row: dict[str, str], key: str, higher_is_better: bool = False) -> str:
        d, se = float(row[key]), float(row[f"{key}_se"])
        return verdict(-d if higher_is_better else d, se)

    at4 = [r for r in rows if r["nfe"] == "4" and r["kind"] == "project" and r.get("dadherence_vs_teacher", "") != ""]
    at5 = [r for r in rows if r["nfe"] == "5" and r["kind"] == "project" and r.get("drmse_vs_peer10", "") != ""]
    if not at4 and not at5:
        return []
    out = ["", "Moonshots (paired on the same seeds; beyond two standard errors counts):", ""]
    out += [f"- NFE 4, {r['method']}: adherence {_f(r, 'adherence')} against the 50-step solve's, difference "
            f"{_pm(r, 'dadherence_vs_teacher', 'dadherence_vs_teacher_se')} "
            f"({judged(r, 'dadherence_vs_teacher', higher_is_better=True)})" for r in at4]
    out += [f"- NFE 5, {r['method']} against {r['peer10']} at NFE 10: RMSE "
            f"{_pm(r, 'drmse_vs_peer10', 'drmse_vs_peer10_se', 4)} ({judged(r, 'drmse_vs_peer10')}), FD b "
            f"{_pm(r, 'dfd_heldout_b_vs_peer10', 'dfd_heldout_b_vs_peer10_se', 1)} "
            f"({judged(r, 'dfd_heldout_b_vs_peer10')})" for r in at5]
    return out


def fd_minus(row: dict[str, str], other: dict[str, str], column: str | None,
             key: str = "fd_heldout_b") -> tuple[float, float, bool]:
    """``row[key]`` minus ``other[key]`` (an FD: ``fd_heldout_b`` or ``fd_teacher_b``) and its standard error: paired
    from ``row[column]`` (a ``d<key>_vs_*`` column pairing it with ``other``) where the row has it, else from the two
    rows' own standard errors (``False``: not paired; both sets' sampling counted twice, so wider; rows scored before
    that column, or paired with another row)."""
    if column and row.get(column, "") != "":
        return float(row[column]), float(row[f"{column}_se"]), True
    se = f"fd_se_{key.removeprefix('fd_')}"
    return float(row[key]) - float(other[key]), math.hypot(float(row[se]), float(other[se])), False


def at_teacher(d: float, se: float, is_paired: bool) -> bool | None:
    """Whether an FD b difference to the 50-step solve's is within noise or below it; ``None`` where only an unpaired
    difference says within noise (pairing, which removes the shared sampling, could make it worse)."""
    judged = verdict(d, se)
    if judged != "within noise":
        return judged == "better"
    return True if is_paired else None


def listed(*parts: tuple[str, list[str], str]) -> str:
    """``; <head><items, comma-joined><tail>`` for each (head, items, tail) with items, as the goal lines list peers."""
    return "".join(f"; {head}{', '.join(items)}{tail}" for head, items, tail in parts if items)


def teacher_fd_clause(table: dict[str, str], peers: list[dict[str, str]], shipped: bool = True) -> str:
    """Beside the goal's FD b to data: ``table``'s FD b to the 50-step solve's images against every peer's, paired where
    ``table`` is the shipped one (the peers' ``dfd_teacher_b_vs_shipped``), else unpaired, which decides only beyond
    noise; peers scored before that column are listed as not scored."""
    if table.get("fd_teacher_b", "") == "":
        return ""
    beaten, kept, open_, unscored = [], [], [], []
    for peer in peers:
        if peer.get("fd_teacher_b", "") == "":
            unscored.append(peer["method"])
            continue
        d, se, is_paired = fd_minus(peer, table, "dfd_teacher_b_vs_shipped" if shipped else None, "fd_teacher_b")
        d, judged = -d, verdict(-d, se)  # the table minus the peer
        if judged == "better":
            beaten.append(peer["method"])
        else:
            (kept if is_paired or judged == "worse" else open_).append(
                f"{peer['method']} ({d:+.2f} ± {se:.2f}{'' if is_paired else ' unpaired'})")
    judged = "not met" if kept else "unresolved" if open_ or unscored else "met"
    words = f" FD b to the 50-step solve's images {judged} (the table's {_pm(table, 'fd_teacher_b', 'fd_se_teacher_b', 2)}): "
    words += f"beats {'every peer' if judged == 'met' else ', '.join(beaten) or 'no peer'}"
    return words + listed(("not ", kept, ""), ("unresolved without pairing: ", open_, ""),
                          ("not scored on it: ", unscored, "")) + "."


def goal_line(table: dict[str, str], at: list[dict[str, str]], ref: dict[str, str], shipped: bool = True) -> str:
    """The goal at one NFE for ``table`` (one of the rows ``at`` that NFE): its RMSE beats the best peer's (the lowest)
    beyond two paired standard errors, and its FD b beats every peer's, except where that peer is within noise of the
    50-step solve's FD b or below it and the table is too (the goal's "be there too": FD to data cannot rank samplers
    beyond the converged teacher's own bias). The peers are paired with ``table`` where it is the ``shipped`` one; an
    unpaired difference decides only when beyond noise (its standard error counts the shared sampling twice, so
    pairing narrows it); within noise, the peer is listed as unresolved."""
    peers = [r for r in at if r["kind"] == "peer"]
    d_rmse, se_rmse = float(table["drmse_vs_peer"]), float(table["drmse_vs_peer_se"])
    d_t, se_t, paired_t = fd_minus(table, ref, "dfd_heldout_b_vs_teacher")
    table_there = at_teacher(d_t, se_t, paired_t)
    beaten, there, lost, open_ = [], [], [], []
    for peer in peers:
        d, se, is_paired = fd_minus(peer, table, "dfd_heldout_b_vs_shipped" if shipped else None)
        d = -d  # the table minus the peer
        judged = verdict(d, se)
        if judged == "better":
            beaten.append(peer["method"])
            continue
        dp, sep, paired_p = fd_minus(peer, ref, "dfd_heldout_b_vs_teacher")
        peer_there = at_teacher(dp, sep, paired_p)
        words = (f"{peer['method']} ({d:+.1f} ± {se:.1f}{'' if is_paired else ' unpaired'}; its own to the 50-step "
                 f"solve's {dp:+.1f} ± {sep:.1f}{'' if paired_p else ' unpaired'})")
        if peer_there and table_there:
            there.append(words)
        elif (is_paired or judged == "worse") and (peer_there is False or table_there is False):
            lost.append(words)
        else:
            open_.append(words)
    fd = "not met" if lost else "unresolved" if open_ else "met"
    line = (f"- NFE {table['nfe']}, {table['method']}: RMSE {'met' if verdict(d_rmse, se_rmse) == 'better' else 'not met'} "
            f"({d_rmse:+.4f} ± {se_rmse:.4f} against {table['best_peer']}). FD b {fd}: "
            f"beats {', '.join(beaten) if beaten else 'no peer'}")
    line += listed(("not ", there, ", at or below the 50-step solve's FD b, where the table is too"), ("not ", lost, ""),
                   ("unresolved without pairing: ", open_, ""))
    return (f"{line} (the table's FD b to the 50-step solve's: {d_t:+.1f} ± {se_t:.1f}{'' if paired_t else ' unpaired'}, "
            f"{verdict(d_t, se_t)})." + teacher_fd_clause(table, peers, shipped))


def goal_lines(rows: list[dict[str, str]], main: list[dict[str, str]] | None = None) -> list[str]:
    """The issue's goals (``goal_line``) per NFE in GOAL_NFE: in a main section for the table shipped at that NFE
    (``shipped``); in a side study (``main``: the rows of its main section) for each of its project rows but the
    shipped one, at an NFE where the study scored every peer the main section has (the peers unpaired with them)."""
    ref = next((r for r in rows if r["kind"] == "reference"), None)
    out: list[str] = []
    for nfe in GOAL_NFE if ref is not None else ():
        at = [r for r in rows if r["nfe"] == str(nfe)]
        if main is None:
            tables = [r for r in at if r.get("shipped") and r["shipped"] == r["method"]]
        else:  # the shipped file (a study may predate the ``shipped`` column) is judged in the main section
            wanted = {r["method"] for r in main if r["nfe"] == str(nfe) and r["kind"] == "peer"}
            have = {r["method"] for r in at if r["kind"] == "peer"}
            tables = [r for r in at if r["kind"] == "project" and wanted <= have
                      and Path(r.get("table") or "").stem != f"{r['teacher']}-best-nfe{nfe}"]
        out += [goal_line(t, at, ref, shipped=main is None) for t in tables if t.get("drmse_vs_peer", "") != ""]
    if not out:
        return []
    which = "the shipped table" if main is None else "each table of this study but the shipped one, unpaired with the peers"
    return ["", f"Goals at NFE 4-8 ({which}; RMSE against the best peer; FD b against every peer, or where a "
            "peer is within noise of the 50-step solve's FD b or below it, the table there too; differences are the "
            "table's minus the peer's, beyond two standard errors counts, paired on the same seeds unless marked; an "
            "unpaired one decides only beyond noise; beside it, where scored, the table's FD b to the 50-step solve's "
            "images against every peer's, the distance to the converged teacher's distribution):", "", *out]


def render(out: Path = OUT, page: Path = PAGE) -> None:
    """docs/results-t2i.md from every docs/results/t2i/methods-*.csv (``out``)."""
    lines = ["# Text-to-image: learned tables against the few-step peers",
             "",
             "Written by `scripts/results_t2i.py` from `docs/results/t2i/methods-*.csv`; do not edit by hand. Held-out",
             "prompts (combinations never used for learning or selection), paired seeds; RMSE/PSNR to the 50-step solve",
             "of the same seed and prompt (decoded images, peak-to-peak 2); FD of decoded images to real held-out images",
             "on `main` (a feature net learners may use) and `b` (one no learner uses); `FD b to 50-step`: FD on `b` to",
             "the 50-step solve's images of the same seeds (the distance to the converged teacher's distribution, beside",
             "FD to data, which the teacher itself does not minimise); `Δ FD b vs 50-step`: the row's FD b minus the",
             "50-step solve's, paired on the same seeds (the goals ask a table to be within noise of it or below where a",
             "peer is); adherence: the judge reads the digit, the colour and the background all right. `Δ vs best",
             "peer`: paired difference to the peer with the lowest RMSE at that NFE (± one standard error; beyond two",
             "counts). Stock peers run inside the stock pipeline, tables through `samplers.sample` (the same images as",
             "`TableScheduler` in the pipeline).", ""]
    lines += teacher_section(out) + solver_section(out)
    for path in sorted(out.glob("methods-*.csv")):
        rows = list(csv.DictReader(path.open()))
        if not rows:
            continue
        head = rows[0]
        study = f": {head['study']}" if head.get("study") else ""
        lines += [f"## {head['teacher']}, guidance {head['guidance']} ({head['n']} samples){study}", "",
                  "| method | NFE | RMSE | PSNR | FD main | FD b | FD b to 50-step | Δ FD b vs 50-step | adherence "
                  "| Δ RMSE vs best peer | Δ FD b vs best peer | Δ adherence vs best peer | fit s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            name = f"**{r['method']}**" if r["kind"] == "project" else r["method"]
            best = r.get("best_peer", "")
            tag = " (best peer)" if best and best == r["method"] else ""
            lines.append(f"| {name}{tag} | {r['nfe']} | {_pm(r, 'rmse', 'rmse_se', 4)} | {_f(r, 'psnr', 2)} | "
                         f"{_pm(r, 'fd_heldout_main', 'fd_se_heldout_main', 1)} | {_pm(r, 'fd_heldout_b', 'fd_se_heldout_b', 1)} | "
                         f"{_pm(r, 'fd_teacher_b', 'fd_se_teacher_b', 2)} | "
                         f"{_pm(r, 'dfd_heldout_b_vs_teacher', 'dfd_heldout_b_vs_teacher_se', 1)} | "
                         f"{_pm(r, 'adherence', 'adherence_se')} | {_pm(r, 'drmse_vs_peer', 'drmse_vs_peer_se', 4)} | "
                         f"{_pm(r, 'dfd_heldout_b_vs_peer', 'dfd_heldout_b_vs_peer_se', 1)} | "
                         f"{_pm(r, 'dadherence_vs_peer', 'dadherence_vs_peer_se')} | {_f(r, 'fit_seconds', 0)} |")
        against = [r for r in rows if r["kind"] == "project" and r.get("drmse_vs_shipped", "") != ""]
        if against:
            lines += ["", "Paired against the table shipped at that NFE when the study ran (same seeds; negative RMSE and "
                      "FD b, positive adherence: the variant is better):", ""]
            lines += [f"- {r['method']}, NFE {r['nfe']}, against {r['shipped']}: RMSE "
                      f"{_pm(r, 'drmse_vs_shipped', 'drmse_vs_shipped_se', 4)}, "
                      f"FD b {_pm(r, 'dfd_heldout_b_vs_shipped', 'dfd_heldout_b_vs_shipped_se', 1)}, adherence "
                      f"{_pm(r, 'dadherence_vs_shipped', 'dadherence_vs_shipped_se')}" for r in against]
        lines += moonshot_lines(rows)
        if not head.get("study"):
            lines += goal_lines(rows)
        elif float(head["guidance"]) == GOAL_GUIDANCE and (main := path.with_name(
                f"methods-{head['teacher']}-w{GOAL_GUIDANCE:g}.csv")).is_file():
            lines += goal_lines(rows, list(csv.DictReader(main.open())))
        stem = path.stem.removeprefix("methods-")
        grids = [f"![NFE {n}](results/t2i/grid-{stem}-nfe{n}.png)" for n in GRID_NFE
                 if (out / f"grid-{stem}-nfe{n}.png").is_file()]
        if grids:
            lines += ["", "Grids: the 50-step solve, then one row per method in the table's order at that NFE "
                      "(seeds 0-7).", "", *grids]
        lines.append("")
    lines += cost_section(out)
    page.write_text("\n".join(lines))
    print(f"wrote {page}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="sd-tiny")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--nfe", type=int, nargs="+", default=[3, 4, 5, 6, 8, 10])
    ap.add_argument("--n", type=int, default=2000, help="samples (evaluation seeds 0..n-1)")
    ap.add_argument("--tables", type=Path, nargs="*", default=[], help="table files to score beside the peers")
    ap.add_argument("--peers", nargs="*", default=None,
                    help="stock peers to run (default: all for the pipeline; none when given without names); with "
                    "--update, stock peers to score again beside update_plan's rows")
    ap.add_argument("--study", default="", help="a name for a side study: its CSV is methods-<teacher>-w<scale>-<study>.csv "
                    "and its page section is headed by it (the images are cached as without it)")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--root", type=Path, default=REPO / "checkpoints", help="folder holding the teachers' folders")
    ap.add_argument("--cache", type=Path, default=REPO / "out" / "t2i-cache", help="where the 50-step images are kept")
    ap.add_argument("--out", type=Path, default=OUT, help="folder of the CSVs and grids")
    ap.add_argument("--page", type=Path, default=PAGE, help="the page rendered from the CSVs in --out")
    ap.add_argument("--render-only", action="store_true", help="only rewrite docs/results-t2i.md from the CSVs")
    ap.add_argument("--update", action="store_true", help="score again only what the section's figures depend on: "
                    "the given tables, its project rows and best peers at these NFEs (update_plan), merged back into "
                    "methods-<teacher>-w<scale>.csv; its other peers keep their rows")
    ap.add_argument("--mark-checked", action="store_true", help="record in each shipped table scored here whether it "
                    "beats the best peer at this guidance (its checked_guidance list)")
    args = ap.parse_args()
    if not all(c.isalnum() or c == "-" for c in args.study):
        ap.error(f"--study is part of a file name: letters, digits and '-' only, got {args.study!r}")
    if args.mark_checked and (args.study or (args.peers is not None and not args.update)):
        ap.error("--mark-checked judges a shipped table against every peer: not with --study or a --peers subset")
    for path in args.tables:
        try:
            SolverTable.load(str(path))
        except TableError as err:
            ap.error(f"--tables: {err}")
    section = args.out / f"methods-{section_stem(args)}.csv"
    if args.update and not args.render_only:
        if not section.is_file():
            ap.error(f"--update: no section {section} to update; score it first without --update")
        n = next(csv.DictReader(section.open()), {}).get("n")
        if n != str(args.n):
            ap.error(f"--update: {section.name} holds {n} samples, not --n {args.n}")
    if not args.render_only:
        run(args, ap.error)
    render(args.out, args.page)


if __name__ == "__main__":
    main()
