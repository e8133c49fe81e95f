"""One-step and two-step students at equal cost, one page per teacher -> docs/results-students-<data>.md and
docs/results/students/ (digits: ``--model edm``, the default; natural-image patches: ``--model patches``).

    python scripts/results_students.py                       # the shipped digits students (DSNO, CD 1- and 2-step)
    python scripts/results_students.py --student "dsno M=1=RUN/dsno-edm.safetensors,RUN/dsno-edm-1nfe.safetensors"
    python scripts/results_students.py --model patches       # the patches DSNO student beside patches-best-nfe<N>
    python scripts/results_students.py --render-only          # rewrite the page from the CSVs
    python scripts/results_students.py --select "dsno M=1=NET,TABLE" "dsno M=4=NET,TABLE" [--ship]
                                                              # which student of a method ships (selection seeds)

Every student (a network file and its table) is costed in teacher forwards per sample: its table's calls times the
FLOPs of one student call over one teacher call (``optimize.evaluation.cost``), and sits in the bucket of the NFE that
costs the same, round(forwards). Each bucket holds the project's best table of that NFE
(``checkpoints/tables/<model>-best-nfe<N>``, where shipped) and the classic solvers euler, dpmpp_2m, ipndm and unipc on
both end conventions (``zero``: EDM's last step to 0; ``sigma_min``: landing on sigma_min unevaluated, as DPM-Solver
and LD3); the best classic of a bucket is the one with the lowest FD train on these very seeds (a choice that favours
the peer). All rows use seeds 0..n-1 (paired); FD on the model's first feature net (``main``; digits: the CNN) against
its training and held-out sets (digits: 1,497 and 300), FD-b on the second (digits: the MLP; no learner and no
selection uses it) against the training set, with bootstrap standard errors; paired differences (student minus other
row, same seeds) with their standard errors.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from samplers import SolverTable, baselines
from samplers.images import write_png_grid
from samplers.nets import load_denoiser, read_net_header

from optimize.base import REPO
from optimize.evaluation.cost import teacher_forwards
from optimize.evaluation import metrics
from optimize.evaluation.evaluate import Judge, evaluate, load_model
from optimize.evaluation.results import Z, paired, verdict, write_csv
from optimize.recipes import selection_scores

DOCS = REPO / "docs" / "results" / "students"
TABLES = REPO / "checkpoints" / "tables"
CLASSICS = ("euler", "dpmpp_2m", "ipndm", "unipc")
ENDS = ("zero", "sigma_min")
KEYS = ("fd_train_main", "fd_heldout_main", "fd_train_b")
GRID = 64
REFERENCE = ("heun", 255)  # the converged teacher: its ODE solved from sigma_max e with Heun on a Karras grid
TEACHER = f"{REFERENCE[0]}@{REFERENCE[1]} (converged teacher)"


@dataclass(frozen=True)
class Teacher:
    """One page: the teacher (``conf/model/<model>.yaml``), the data's name in file names, the students shown by default
    (label, network, table) and how the page names the data."""
    model: str
    data: str
    shipped: tuple[tuple[str, str, str], ...]
    title: str

    @property
    def page(self) -> Path:
        return REPO / "docs" / f"results-students-{self.data}.md"

    @property
    def prefix(self) -> str:  # the digits page keeps its older, unprefixed file names
        return "" if self.data == "digits" else f"{self.data}-"

    @property
    def meta(self) -> Path:
        return DOCS / ("meta.csv" if not self.prefix else f"meta-{self.data}.csv")

    @property
    def notes(self) -> Path:
        return DOCS / ("notes.md" if not self.prefix else f"notes-{self.data}.md")


TEACHERS = {
    "edm": Teacher("edm", "digits", (
        ("dsno", "checkpoints/dsno-digits.safetensors", "checkpoints/tables/dsno-digits-1nfe.safetensors"),
        ("cd", "checkpoints/cd-digits.safetensors", "checkpoints/tables/cd-digits-1nfe.safetensors"),
        ("cd 2-step", "checkpoints/cd-digits.safetensors", "checkpoints/tables/cd-digits-2nfe.safetensors")),
        "the digits teacher"),
    "patches": Teacher("patches", "patches", (
        ("dsno", "docs/results/students/nets/dsno-patches.safetensors",
         "docs/results/students/nets/dsno-patches-1nfe.safetensors"),),
        "the natural-image patches teacher (3x32x32)"),
}


def parse_student(text: str) -> tuple[str, str, str]:
    """``LABEL=NET,TABLE`` -> (label, net path, table path); ValueError otherwise."""
    label, sep, rest = text.rpartition("=")
    net, comma, table = rest.partition(",")
    if not sep or not comma or not label:
        raise ValueError(f"--student and --select take LABEL=NET,TABLE, got {text!r}")
    return label, net, table


def load_teacher(teacher: Teacher, n_boot: int) -> tuple[Any, Any, Judge]:
    """The teacher's config (``conf/model/<model>.yaml``), model and judge."""
    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{teacher.model}.yaml")
    model = load_model(cfg, "cpu")
    return cfg, model, Judge.for_model(cfg, model.shape, "cpu", n_boot=n_boot)


def load_student(net: str, table_path: str) -> tuple[Any, SolverTable]:
    """A student's network and its table, checked to be made for that network."""
    den = load_denoiser(str(REPO / net))
    return den, SolverTable.load(str(REPO / table_path), fingerprint=den.fingerprint())


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-")


def run(args: argparse.Namespace, teacher: Teacher, extra: list[tuple[str, str, str]]) -> None:
    cfg, model, judge = load_teacher(teacher, args.n_boot)
    seeds = list(range(args.n))
    sigma_min, sigma_max = float(cfg.sigma_min), float(cfg.sigma_max)
    x1 = sigma_max * torch.randn(16, *model.shape, generator=torch.Generator().manual_seed(0))
    rows: list[dict[str, Any]] = []
    grids: dict[str, torch.Tensor] = {}
    reference: list[torch.Tensor] = []  # the converged teacher's samples, once scored (the first row)

    def add(label: str, kind: str, bucket: int, forwards: float, denoiser: Any, table: SolverTable, **extra: Any) -> None:
        r = evaluate(denoiser, table, judge=judge, shape=model.shape, seeds=seeds, dtype=model.dtype)
        x = r.pop("samples")
        grids[label] = x[:GRID]
        near = metrics.distance(x, reference[0]) if reference else {}
        if not reference:  # the first row, the converged teacher: every later row's distance is to its samples
            reference.append(x)
        rows.append({"method": label, "kind": kind, "bucket": bucket, "nfe": table.nfe, "teacher_forwards": forwards,
                     **r, **{k: v for k, v in near.items() if k in ("rmse", "rmse_se", "_rmse")}, **extra})
        print(f"{label} (bucket {bucket}): FD train {r['fd_train_main']:.3g}, FD-b {r['fd_train_b']:.3g}"
              + (f", RMSE to the teacher {near['rmse']:.4f}" if near else ""), flush=True)

    solver, steps = REFERENCE
    add(TEACHER, "teacher", steps, float(steps), model.denoiser,
        baselines.build(solver, steps, sigma_min=sigma_min, sigma_max=sigma_max))

    buckets = set(args.nfe)
    for label, net, table_path in [*teacher.shipped, *extra]:
        den, table = load_student(net, table_path)
        forwards = teacher_forwards(den, model.denoiser, x1, sigma_max, calls=table.nfe)
        bucket = max(1, round(forwards))
        buckets.add(bucket)
        header = read_net_header(str(REPO / net))[1]
        add(label, "student", bucket, forwards, den, table, network=net, table_file=table_path,
            train_seconds=header.get("train_seconds"), steps=header.get("global_step", header.get("steps")),
            method_of_table=table.metadata.get("method"))
    for nfe in sorted(buckets):
        best = TABLES / f"{teacher.model}-best-nfe{nfe}.safetensors"
        if best.is_file():
            add(f"{teacher.model}-best-nfe{nfe}", "best table", nfe, float(nfe), model.denoiser,
                SolverTable.load(str(best), fingerprint=model.fingerprint), table_file=str(best.relative_to(REPO)))
        for solver in CLASSICS if nfe > 1 else CLASSICS[:1]:  # at one call every classic is D(sigma_max e)
            for end in ENDS:
                table = baselines.build(solver, nfe, sigma_min=sigma_min, sigma_max=sigma_max, end=end)
                add(f"{solver}:{end}@{nfe}", "classic", nfe, float(nfe), model.denoiser, table)
    add_paired(rows)
    DOCS.mkdir(parents=True, exist_ok=True)
    write_csv([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], str(DOCS / f"{teacher.data}.csv"))
    for r in rows:
        if r["kind"] != "classic" or r.get("best_classic"):
            write_png_grid(grids[r["method"]].clamp(-1, 1), str(DOCS / f"grid-{teacher.prefix}{slug(r['method'])}.png"))
    meta = {"argv": " ".join(sys.argv[1:]), "date": datetime.date.today().isoformat(), "n": args.n,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
            "fingerprint": model.fingerprint}
    with open(teacher.meta, "w", newline="") as f:
        w = csv.writer(f)
        w.writerows(meta.items())
    render(teacher)


def add_paired(rows: list[dict[str, Any]]) -> None:
    """Per bucket: flag the best classic (lowest FD train), then each student's paired differences to the best table,
    the best classic and every other student of its bucket, to the best tables of the dearer buckets (a student that
    beats a table costing more) and to the converged teacher; ``compared_with`` lists them. Each best table gets its
    differences to the converged teacher too (how far above the teacher's own FD it sits). FD on KEYS, and the RMSE to
    the teacher's samples where both rows have it (the teacher's own row has none)."""
    teacher = [r for r in rows if r["kind"] == "teacher"]

    def diff(s: dict[str, Any], o: dict[str, Any]) -> None:
        for key in KEYS:
            d, se = paired(s, o, key)
            s[f"d{key}_vs_{slug(o['method'])}"], s[f"d{key}_vs_{slug(o['method'])}_se"] = d, se
        if "_rmse" in s and "_rmse" in o:
            s[f"drmse_vs_{slug(o['method'])}"], s[f"drmse_vs_{slug(o['method'])}_se"] = metrics.paired_mean(s["_rmse"], o["_rmse"])

    for bucket in sorted({r["bucket"] for r in rows if r["kind"] != "teacher"}):
        at = [r for r in rows if r["bucket"] == bucket and r["kind"] != "teacher"]
        classics = [r for r in at if r["kind"] == "classic"]
        if classics:
            min(classics, key=lambda r: r["fd_train_main"])["best_classic"] = True
        others = [r for r in at if r["kind"] == "best table" or r.get("best_classic")]
        dearer = [r for r in rows if r["kind"] == "best table" and r["bucket"] > bucket]  # tables that cost more
        for s in (r for r in at if r["kind"] == "student"):
            against = others + [r for r in at if r["kind"] == "student" and r is not s] + dearer + teacher
            for o in against:
                diff(s, o)
            s["compared_with"] = "|".join(o["method"] for o in against)
        for t in (r for r in at if r["kind"] == "best table"):
            for o in teacher:
                diff(t, o)


def _f(v: str, digits: int = 3) -> str:
    try:
        return f"{float(v):.{digits}g}"
    except (TypeError, ValueError):
        return "-"


def _pm(r: dict[str, str], key: str) -> str:
    se = r.get(key.replace("fd_", "fd_se_", 1) if key.startswith("fd_") else f"{key}_se")
    return f"{_f(r.get(key))} ± {_f(se, 2)}" if se else _f(r.get(key))


def _diff(r: dict[str, str], key: str, other: str) -> str:
    d, se = r.get(f"d{key}_vs_{slug(other)}"), r.get(f"d{key}_vs_{slug(other)}_se")
    if not d:
        return "-"
    d, se = float(d), float(se)
    return f"{d:+.3g} ± {se:.2g} ({verdict(d, se)})"


MEASURES = {"fd_train_main": "FD train", "fd_heldout_main": "FD held-out", "fd_train_b": "FD-b train",  # KEYS' names
            "rmse": "RMSE to the teacher"}
GOAL_KEYS = ("fd_train_b", "fd_heldout_main")  # issue 27's measures: the feature net no learner uses, held-out data


def goal_lines(rows: list[dict[str, str]]) -> list[str]:
    """Issue 27's goals, each from the CSV's paired differences (beyond the paired uncertainty on GOAL_KEYS): DSNO at
    M = 4 against the best table at NFE 4; DSNO at M = 1 against the best table at NFE 2 and the CD student at one step;
    the moonshot, a one-call student within noise of (or better than) the best table at NFE 4 on every measure. A goal
    whose rows are not on this page is left out."""
    tables = {int(r["bucket"]): r["method"] for r in rows if r["kind"] == "best table"}
    students = [r for r in rows if r["kind"] == "student"]
    dsno = [r for r in students if r["method"].split(" ")[0] == "dsno"]
    cd = [r for r in students if r["method"].split(" ")[0] == "cd" and int(r["bucket"]) == 1]

    def against(s: dict[str, str], other: str, keys: tuple[str, ...], ok: tuple[str, ...]) -> tuple[bool, str]:
        found = [key for key in keys if s.get(f"d{key}_vs_{slug(other)}") not in (None, "")]
        met = len(found) == len(keys) and all(
            verdict(float(s[f"d{key}_vs_{slug(other)}"]), float(s[f"d{key}_vs_{slug(other)}_se"])) in ok for key in found)
        return met, f"`{other}`: " + ", ".join(f"{MEASURES[key]} {_diff(s, key, other)}" for key in found)

    def line(goal: str, checks: list[tuple[bool, str]], extra: str = "") -> str:
        met = bool(checks) and all(c[0] for c in checks)
        return f"- {goal}: **{'met' if met else 'not met'}** (" + "; ".join(c[1] for c in checks) + extra + ")."

    def beside(s: dict[str, str], other: str) -> str:  # the distance to the teacher, reported, not a criterion
        return f"; beside it, {MEASURES['rmse']} {_diff(s, 'rmse', other)}" if s.get(f"drmse_vs_{slug(other)}") else ""

    out = []
    for s in (r for r in dsno if int(r["bucket"]) == 4 and 4 in tables):
        out.append(line(f"DSNO at M = 4 (`{s['method']}`) beats the best table at NFE 4",
                        [against(s, tables[4], GOAL_KEYS, ("better",))], beside(s, tables[4])))
    for s in (r for r in dsno if int(r["bucket"]) == 1):
        checks = [against(s, o, GOAL_KEYS, ("better",)) for o in [tables[2]] * (2 in tables) + [c["method"] for c in cd]]
        out.append(line(f"DSNO at M = 1 (`{s['method']}`) beats the best table at NFE 2 and the CD student at one step",
                        checks))
    for s in (r for r in students if int(r["nfe"]) == 1 and 4 in tables and int(r["bucket"]) < 4):
        forwards = _f(s["teacher_forwards"])
        out.append(line(f"Moonshot, a one-call student cheaper than the best table at NFE 4 (`{s['method']}`, {forwards} "
                        f"teacher forward{'' if forwards == '1' else 's'}) within noise of it",
                        [against(s, tables[4], KEYS, ("better", "within noise"))]))
    if not out:
        return []
    floor = []
    for t in (r for r in rows if r["kind"] == "best table" and r.get(f"dfd_train_b_vs_{slug(TEACHER)}")):
        floor.append(f"`{t['method']}` minus the converged teacher: " + ", ".join(
            f"{MEASURES[key]} {_diff(t, key, TEACHER)}" for key in GOAL_KEYS))
    floor_text = ([f"How far the tables sit above the converged teacher's own FD ({TEACHER}, same seeds): "
                   + "; ".join(floor) + ". A table within noise of the teacher on a measure can only be beaten "
                   "there by a student better than the teacher it distils; the RMSE to the teacher's samples (reported "
                   "beside, no goal uses it) still separates them.", ""] if floor else [])
    return ["## Goals", "", f"Issue 27's goals, from the paired differences above (beyond {Z:g} standard errors on FD-b and "
            "on held-out data; the moonshot: no measure worse):", "", *out, "", *floor_text]


def selection_lines(path: Path) -> list[str]:
    """The page's account of ``--select`` (which student of a method ships), from its CSV."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    chosen = next(r for r in rows if r["chosen"] == "True")
    return ["## Which student ships", "",
            f"`{chosen['label']}` ships (the `{chosen['label'].split(' ')[0]}` rows above): the lowest FD train (main "
            f"features) on {int(rows[0]['n_select']):,} selection seeds (3,000,000.., never the evaluation seeds above; "
            "`python scripts/results_students.py --select ... --ship`) among "
            + ", ".join(f"`{r['label']}` {float(r['fd_train_main_select']):.3g}" for r in rows)
            + f" (`docs/results/students/{path.name}`).", ""]


def render(teacher: Teacher) -> None:
    """docs/results-students-<data>.md from docs/results/students/<data>.csv and its meta CSV."""
    with open(DOCS / f"{teacher.data}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(teacher.meta, newline="") as f:
        meta = dict(csv.reader(f))
    names = {"dsno": "DSNO", "cd": "consistency distillation"}
    kinds = list(dict.fromkeys(names.get(r["method"].split(" ")[0], r["method"].split(" ")[0])
                               for r in rows if r["kind"] == "student"))  # in the order of the rows
    lines = [
        f"# Students at equal cost: {' and '.join(kinds)} on {teacher.title}",
        "",
        f"Generated by `python scripts/results_students.py {meta['argv']}` on {meta['date']} ({meta['machine']}) from "
        f"`docs/results/students/{teacher.data}.csv`. Teacher fingerprint "
        f"`{meta['fingerprint']}`. Seeds 0..{int(meta['n']) - 1} for every row (paired). A student sits in the bucket of "
        "the NFE that costs the same teacher forwards (its calls times the FLOPs of one student call over one teacher "
        f"call). FD on the first feature net (`main`) against the training and the held-out {teacher.data}; FD-b on the "
        f"second (no learner or selection sees it) against the training {teacher.data}; ± bootstrap standard errors. "
        "`best table`: the "
        f"shipped `{teacher.model}-best-nfe<N>` (selected on FD train of seeds 3,000,000..); classics on both end conventions, the best "
        "one per bucket chosen on these very seeds (bold; a choice that flatters the peer).",
        "",
    ]
    teacher_at = {int(r["bucket"]) for r in rows if r["kind"] == "teacher"}
    for bucket in sorted({int(r["bucket"]) for r in rows}, key=lambda b: (b in teacher_at, b)):  # the teacher last
        at = [r for r in rows if int(r["bucket"]) == bucket]
        title = (f"The converged teacher ({bucket} teacher forwards)" if bucket in teacher_at else
                 f"{bucket} teacher forward{'s' if bucket > 1 else ''}")
        lines += [f"## {title}", "",
                  "| method | kind | NFE | teacher forwards | FD train | FD held-out | FD-b train | RMSE to the teacher | train s |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in at:
            name = f"**{r['method']}**" if r.get("best_classic") == "True" else r["method"]
            lines.append(f"| {name} | {r['kind']} | {r['nfe']} | {_f(r['teacher_forwards'])} | {_pm(r, 'fd_train_main')} | "
                         f"{_pm(r, 'fd_heldout_main')} | {_pm(r, 'fd_train_b')} | {_pm(r, 'rmse')} | "
                         f"{_f(r.get('train_seconds'), 4)} |")
        students = [r for r in at if r["kind"] == "student"]
        if students:
            lines += ["", "Paired differences, student minus row, against its bucket, the best tables that cost more and "
                      "the converged teacher (negative: the student is better; beyond "
                      f"{Z:g} standard errors counts):", "",
                      "| student | against | FD train | FD held-out | FD-b train | RMSE to the teacher |",
                      "| --- | --- | ---: | ---: | ---: | ---: |"]
            for s in students:
                for o in s["compared_with"].split("|"):
                    lines.append(f"| {s['method']} | {o} | {_diff(s, 'fd_train_main', o)} | "
                                 f"{_diff(s, 'fd_heldout_main', o)} | {_diff(s, 'fd_train_b', o)} | {_diff(s, 'rmse', o)} |")
        grids = [r["method"] for r in at if r["kind"] != "classic" or r.get("best_classic") == "True"]
        lines += ["", " ".join(f"![{g}](results/students/grid-{teacher.prefix}{slug(g)}.png)" for g in grids), "",
                  "Grids, left to right: " + ", ".join(grids) + " (first 64 seeds).", ""]
    lines += goal_lines(rows) + selection_lines(DOCS / f"selection-{teacher.data}.csv")
    if teacher.notes.is_file():
        lines += [teacher.notes.read_text().strip(), ""]
    teacher.page.write_text("\n".join(lines))
    print(f"wrote {teacher.page.relative_to(REPO)}", flush=True)


def select(args: argparse.Namespace, teacher: Teacher, cands: list[tuple[str, str, str]],
           shipped: tuple[str, str, str] | None) -> None:
    """Score the candidates (students of one method) by the selection rule of every results page
    (``optimize.recipes.selection_scores``: FD train, main features, on ``--n-select`` seeds 3,000,000.., never the
    evaluation seeds), write ``selection-<data>.csv`` and, with ``--ship``, copy the lowest to the page's ``shipped``
    files of that method (its network, and its table with ``student`` naming the shipped network)."""
    _, model, judge = load_teacher(teacher, 0)
    jobs = [(label, *load_student(net, table_path)) for label, net, table_path in cands]
    scores = selection_scores(judge, args.n_select, jobs, model.shape)
    chosen = min(scores, key=scores.get)
    write_csv([{"label": label, "network": net, "table": table_path, "n_select": args.n_select,
                "fd_train_main_select": scores[label], "chosen": label == chosen} for label, net, table_path in cands],
              str(DOCS / f"selection-{teacher.data}.csv"))
    print(f"chosen: {chosen}", flush=True)
    if args.ship:
        _, net, table_path = next(c for c in cands if c[0] == chosen)
        shutil.copyfile(REPO / net, REPO / shipped[1])
        table = SolverTable.load(str(REPO / table_path))  # as written by its run, not the copy the selection sampled
        table.metadata["student"] = shipped[1]
        table.save(str(REPO / shipped[2]))
        print(f"shipped {chosen} as {shipped[1]} and {shipped[2]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(TEACHERS), default="edm", help="the teacher (conf/model/<model>.yaml)")
    ap.add_argument("--student", action="append", default=[], help="LABEL=NET,TABLE: one more student (repeatable)")
    ap.add_argument("--nfe", type=int, nargs="*", default=[1, 2, 3, 4], help="buckets shown even without a student")
    ap.add_argument("--n", type=int, default=2000, help="samples (seeds 0..n-1)")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--render-only", action="store_true", help="only rewrite the page from the CSVs")
    ap.add_argument("--select", nargs="+", metavar="LABEL=NET,TABLE", default=None,
                    help="instead of the page: score these students of one method on the selection seeds")
    ap.add_argument("--n-select", type=int, default=2000, help="selection samples (seeds 3,000,000..)")
    ap.add_argument("--ship", action="store_true", help="with --select: copy the chosen one to the shipped files")
    args = ap.parse_args()
    teacher = TEACHERS[args.model]
    if args.ship and not args.select:
        ap.error("--ship needs --select")
    try:
        extra, cands = [parse_student(s) for s in args.student], [parse_student(c) for c in args.select or []]
    except ValueError as err:
        ap.error(str(err))
    methods = sorted({label.split(" ")[0] for label, _, _ in cands})
    if len(methods) > 1:
        ap.error(f"--select compares students of one method, got {', '.join(methods)}")
    shipped = next((s for s in teacher.shipped if s[0] in methods), None)
    if args.ship and shipped is None:
        ap.error(f"--ship: the {teacher.data} page ships no {methods[0]} student")
    torch.set_num_threads(1)
    if cands:
        select(args, teacher, cands, shipped)
    else:
        render(teacher) if args.render_only else run(args, teacher, extra)


if __name__ == "__main__":
    main()
