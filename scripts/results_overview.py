"""One overview of every result: for each model the best table of each method at each NFE beside the best classic
solver -> docs/results.md.

    python scripts/results_overview.py                     # reads docs/results/**.csv, writes docs/results.md
    python scripts/results_overview.py --results DIR --out PAGE

Reads only the committed CSVs under docs/results/ (no sampling, no model): every figure on the page comes from them.
Per model one run is the *main* one (its classic rows and its methods share the evaluation seeds and the real set):
the best classic at an NFE comes from it, and a paired verdict against that best classic is printed only where the
main run's CSV stores the paired difference (``d<metric>_best`` / ``_best_se``, with ``best_classic`` naming the
baseline). Figures from any other CSV (other runs) carry a footnote naming their page and never a verdict.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimize.evaluation.report import NOTE, best, diff_text, pm, table
from optimize.evaluation.results import read_results

REPO = Path(__file__).resolve().parents[1]

Row = dict[str, Any]

CLASSIC = {"euler", "heun", "dpmpp_2m", "dpmpp_3m", "ipndm", "unipc"}
FAMILIES = ["tuned classic", "LD3", "IIA", "DDSS", "TADA", "DSNO", "CD"]  # column order; unknown families follow
SKIP_KINDS = {"teacher", "shipped", "reference", "real", "converged", "best table"}  # best table: a copy of a main row
MARKS = "¹²³⁴⁵⁶⁷⁸⁹"

# Detail pages (docs/<page>, what it holds); any other docs/results-*.md is listed too, by name.
PAGES = [
    ("results-classic.md", "every classic solver at NFE 3-20, digits and gmm, with reference points"),
    ("results-learned.md", "digits: classic, tuned classic, LD3, IIA and DDSS in one paired run; the shipped tables"),
    ("results-learned-gmm.md", "gmm: the same comparison on the analytic Gaussian mixture"),
    ("results-patches.md", "patches: every method on the 3x32x32 natural-image teacher"),
    ("results-iia.md", "IIA against every classic solver, digits"),
    ("results-iia-gmm.md", "IIA against every classic solver, gmm"),
    ("results-ddss.md", "DDSS tables (KID-only GGDM), digits"),
    ("results-tada.md", "TADA (augmented-noise sampler) vs classic solvers, digits"),
    ("results-dsno.md", "DSNO one-step student (the 1,000-step ablations), digits"),
    ("results-students-digits.md", "one- and two-step students (DSNO, CD) at equal cost beside the best tables, digits"),
    ("results-students-patches.md", "the DSNO student at equal cost beside the best table and the classics, patches"),
    ("results-t2i.md", "text-to-image: learned tables against stock schedulers, AYS, OSS and LD3"),
    ("results-diffusers.md", "the diffusers scheduler end to end"),
]


@dataclass
class Source:
    """One results CSV (relative to the results directory) and the page (relative to docs/) that shows it."""

    csv: str
    page: str
    default_family: str | None = None  # family of rows that neither their name nor their group/kind identifies
    current: bool = False  # holds the shipped students: its rows stand before the main run's for its families


@dataclass
class Model:
    """One model's section: the main paired run, the classic page for NFEs the main run lacks, other runs."""

    title: str
    metric: str
    metric_text: str
    main: Source
    classic: Source | None = None
    others: list[Source] = field(default_factory=list)


MODELS = [
    Model("digits (`model=edm`, the 8x8 digits teacher)", "fd_train_main", "FD against the training digits, `main` (CNN) features",
          Source("learned/edm/results.csv", "results-learned.md"), Source("edm/results.csv", "results-classic.md"),
          [Source("tada/results.csv", "results-tada.md", "TADA"),
           Source("students/digits.csv", "results-students-digits.md", current=True),
           Source("dsno/results.csv", "results-dsno.md", "DSNO")]),
    Model("gmm (`model=gmm`, the analytic Gaussian mixture)", "fd_train_raw", "FD against the training set, raw coordinates",
          Source("learned/gmm/results.csv", "results-learned-gmm.md"), Source("gmm/results.csv", "results-classic.md"),
          [Source("iia/gmm/results.csv", "results-iia-gmm.md", "IIA")]),
    Model("patches (`model=patches`, the 3x32x32 natural-image teacher)", "fd_train_main",
          "FD against the training patches, `main` features", Source("patches/results.csv", "results-patches.md"),
          others=[Source("students/patches.csv", "results-students-patches.md", current=True)]),
]


def read_rows(path: Path) -> list[Row]:
    """The rows of a results CSV (``optimize.evaluation.results.read_results``) with ``nfe`` as int (rows without an NFE are dropped)."""
    return [{**r, "nfe": int(r["nfe"]), "method": str(r.get("method") or "").strip()}
            for r in read_results(str(path)) if isinstance(r.get("nfe"), float)]


def family(row: Row, default: str | None = None) -> str | None:
    """``classic``, a method family (``FAMILIES`` or a new group/kind name) or None (teacher, shipped copy, reference)."""
    kind = str(row.get("group") or row.get("kind") or "").strip().lower()
    name = row["method"].lower()
    if kind in SKIP_KINDS:
        return None
    base = re.sub(r"-\d+$", "", re.split(r"[\s(+]", name)[0])
    if "+tuned" in name or kind in {"tuned", "tuned classic"}:
        return "tuned classic"
    if base == "cd":  # consistency distillation (the students pages)
        return "CD"
    for prefix, fam in (("ld3", "LD3"), ("iia", "IIA"), ("ddss", "DDSS"), ("tada", "TADA"), ("dsno", "DSNO")):
        if name.startswith(prefix) or kind == prefix:
            return fam
    if kind == "classic" or (base in CLASSIC and "+" not in name):
        return "classic"
    if kind and kind not in {"ours", "learned"}:
        return kind
    return default or kind or None


def best_classic(rows: list[Row], metric: str) -> Row | None:
    """The best classic row of one run at one NFE: the one its ``best_classic`` column names (the baseline of its
    paired differences) when it has one, else the lowest ``metric``."""
    classic = [r for r in rows if r["_family"] == "classic"]
    named = {r.get("best_classic") for r in rows if isinstance(r.get("best_classic"), str)}
    if len(named) == 1:
        hit = [r for r in classic if r["method"] == next(iter(named))]
        if hit:
            return hit[0]
    return best(classic, metric)


def verdict_text(row: Row, base: Row, metric: str) -> str:
    """``Δ ... better/≈/worse`` from the row's stored paired difference to ``base`` ('' when it stores none)."""
    d, se = row.get(f"d{metric}_best"), row.get(f"d{metric}_best_se")
    if row.get("best_classic") != base["method"] or not isinstance(d, float) or not isinstance(se, float):
        return ""
    return f" (Δ {diff_text(d, se)})"


def load(results: Path, src: Source | None) -> list[Row]:
    """Every row of one source with its family (``_family``, None for teacher/shipped/reference rows) and source
    (``_src``); [] when there is no source or its CSV is absent."""
    if src is None or not (results / src.csv).is_file():
        return []
    return [{**r, "_family": family(r, src.default_family), "_src": src} for r in read_rows(results / src.csv)]


def section(results: Path, model: Model) -> str:
    """One model's markdown: the table, its footnotes and links (empty string when no source has rows)."""
    loaded = load(results, model.main)
    teacher = [r for r in loaded if str(r.get("group") or r.get("kind") or "").lower() == "teacher"]
    main = [r for r in loaded if r["_family"]]
    classic_page = [r for r in load(results, model.classic) if r["_family"]]
    others = [[r for r in load(results, s) if r["_family"]] for s in model.others]
    if not main and not any(others):
        return ""
    metric = model.metric
    method_rows = [r for rows in [main, *others] for r in rows if r["_family"] != "classic"]
    nfes = sorted({r["nfe"] for r in method_rows})
    fams = [f for f in FAMILIES if any(r["_family"] == f for r in method_rows)]
    fams += list(dict.fromkeys(r["_family"] for r in method_rows if r["_family"] not in FAMILIES))
    notes: dict[str, str] = {}  # page -> footnote mark

    def mark(src: Source) -> str:
        if src.page not in notes:
            notes[src.page] = MARKS[len(notes) % len(MARKS)]
        return notes[src.page]

    def cell(r: Row | None, base: Row | None) -> str:
        if r is None:
            return "-"
        text = f"{r['method']} {pm(r, metric)}"
        if r["_src"] is not model.main:
            return text + " " + mark(r["_src"])
        return text + (verdict_text(r, base, metric) if base is not None and base["_src"] is model.main else "")

    current = [rows for rows, src in zip(others, model.others) if src.current]
    older = [rows for rows, src in zip(others, model.others) if not src.current]
    body, verdicts = [], False
    for n in nfes:
        at_main = [r for r in main if r["nfe"] == n]
        base = best_classic(at_main, metric) or best_classic([r for r in classic_page if r["nfe"] == n], metric)
        cells = [str(n), cell(base, None)]
        for fam in fams:
            pick = None
            for rows in [*current, at_main, *older]:
                # a current run first, then the main run, then another run where neither has this family at this NFE
                pick = pick or best([r for r in rows if r["nfe"] == n and r["_family"] == fam], metric)
            cells.append(cell(pick, base))
            verdicts = verdicts or "Δ" in cells[-1]
        body.append(cells)

    main_page = f"[{model.main.page}]({model.main.page})"
    pages = dict.fromkeys(s.page for s in [model.main, *model.others, model.classic] if s is not None)
    out = [f"## {model.title}\n\n",
           f"Detail: {', '.join(f'[{p}]({p})' for p in pages)}. Metric: {model.metric_text} (`{metric}`), lower is "
           f"better, ± 1 se; each cell names the best table of that method at that NFE, picked on the evaluation seeds.\n\n"]
    if teacher:
        out.append(f"Converged teacher ({teacher[0]['method']}, NFE {teacher[0]['nfe']}): {pm(teacher[0], metric)}.\n\n")
    out.append(table(["NFE", "best classic", *fams], body))
    out.append("\n")
    if verdicts:
        out.append(f"Δ = table − best classic at that NFE, paired (same seeds, same real set), as stored by {main_page} "
                   f"(a cell without Δ: none stored).\n")
    else:
        out.append(f"Unmarked cells come from one paired run ({main_page}), but its CSV stores no paired difference to "
                   f"the best classic, so no verdict is printed here (that page has the paired differences).\n")
    for page, m in notes.items():
        out.append(f"\n{m} From [{page}]({page}), a separate run: not paired with the other cells of its row, so no verdict.\n")
    return "".join(out)


def build(results: Path, docs: Path | None = None) -> str:
    """The overview page for the results directory ``results`` (detail pages looked up in ``docs``, default its parent)."""
    docs = docs or results.parent
    known = [(p, what) for p, what in PAGES if (docs / p).is_file()]
    extra = sorted(p.name for p in docs.glob("results-*.md") if p.name not in dict(PAGES))
    pages = "\n".join(f"- [{p}]({p}): {what}" for p, what in known) + "".join(f"\n- [{p}]({p})" for p in extra)
    head = ("# Results overview\n\nGenerated by `python scripts/results_overview.py` from the committed CSVs under "
            "`docs/results/` (nothing is re-measured). For each model: at each NFE where a learned or other non-classic "
            "method was measured, the best classic solver and the best table of each method. Classic-only NFEs are on "
            "the classic page.\n\n" + NOTE + "\n\nDetail pages:\n\n" + pages + "\n\n")
    return head + "\n".join(s for s in (section(results, m) for m in MODELS) if s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(REPO / "docs" / "results"), help="directory of the results CSVs")
    ap.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    args = ap.parse_args()
    text = build(Path(args.results))
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
