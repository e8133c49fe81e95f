"""Markdown pieces for the results pages (scripts/results_*.py): figures with their intervals and paired verdicts.

Every cell that shows a FD or KID shows its standard error (``12.1 ± 0.8``; ``optimize.evaluation.judge``), and a comparison of
two samplers is the paired difference on the same seeds (``optimize.evaluation.results.paired``) with a verdict: ``better`` /
``worse`` when it is beyond ``Z`` standard errors, ``≈`` (within noise) otherwise.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

from optimize.evaluation.results import Z, paired, verdict


def fmt(v: Any, digits: int = 3) -> str:
    """A number to ``digits`` significant digits; ``-`` for None/NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}g}" if isinstance(v, (float, int)) and not isinstance(v, bool) else str(v)


def se_key(key: str) -> str:
    """The standard-error column of a metric column: ``fd_train_main`` -> ``fd_se_train_main`` (same for kid)."""
    metric, _, rest = key.partition("_")
    return f"{metric}_se_{rest}"


def pm(row: dict[str, Any], key: str, digits: int = 3) -> str:
    """``value ± se`` of a metric column (just the value when the row has no se for it)."""
    v, se = row.get(key), row.get(se_key(key))
    if isinstance(se, float) and math.isfinite(se) and isinstance(v, float):
        return f"{fmt(v, digits)} ± {se:.2g}"
    return fmt(v, digits)


def diff_text(d: float, se: float) -> str:
    """A (lower-is-better) paired difference with its standard error and verdict, e.g. ``-3.1 ± 0.6 **better**``."""
    return f"{d:+.3g} ± {se:.2g} " + {"better": "**better**", "worse": "worse", "within noise": "≈"}[verdict(d, se)]


def diff_cell(row: dict[str, Any], base: dict[str, Any], key: str) -> str:
    """Paired ``row - base`` on ``key`` as diff_text, or ``(baseline)`` for the base row itself."""
    return "(baseline)" if row is base else diff_text(*paired(row, base, key))


def best(rows: Iterable[dict[str, Any]], key: str, where: Callable[[dict[str, Any]], bool] = lambda r: True) -> dict[str, Any] | None:
    """The row with the lowest ``key`` among those ``where`` accepts (None if none; rows without a number there, or
    with NaN, never count)."""
    cands = [r for r in rows if where(r) and isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return min(cands, key=lambda r: r[key]) if cands else None


def table(head: Sequence[str], body: Iterable[Sequence[str]], align_right_from: int = 1) -> str:
    """A markdown table (numbers right-aligned from column ``align_right_from``)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < align_right_from else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def pivot(rows: list[dict[str, Any]], key: str, nfes: Sequence[int], digits: int = 3, with_se: bool = True) -> str:
    """One row per method, one column per NFE, cells ``value ± se``."""
    body = []
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = {int(r["nfe"]): r for r in rows if r["method"] == method}
        body.append([method] + [pm(cells[k], key, digits) if with_se and k in cells else fmt(cells[k][key], digits) if k in cells else "-"
                                for k in nfes])
    return table(["method", *[f"NFE {k}" for k in nfes]], body)


NOTE = (f"Intervals are ± 1 standard error that counts the sampling of both the generated and the real set (KID: "
        f"two-sample jackknife; FD: bootstrap of both sets). A paired difference (same seeds, same real set) is called "
        f"**better** / worse only beyond {Z:g} standard errors, ≈ otherwise.")
