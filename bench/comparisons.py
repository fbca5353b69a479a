"""Derived figures of the perplexity table: gap closed, paired-bootstrap comparisons and the verdicts.

Pure functions over the table's row dict (``bench/ppl_table.py`` writes it), so the published
decisions ("does diag beat obs?") are computed, tested, and re-rendered from the JSON, never typed.
"""

from __future__ import annotations

from typing import Any

from libortho.eval.stats import holm, paired_bootstrap_ppl_diff


def ppl_of(row: dict[str, Any], alpha: int = 1) -> dict[str, Any] | None:
    """The measurement dict of a row: ``alpha1``/``alpha0`` for LibOrtho rows, ``ppl_measured`` otherwise."""
    if "error" in row:
        return None
    return row.get(f"alpha{alpha}") or row.get("ppl_measured")


def gptq_reference(rows: dict[str, dict], gs: int) -> dict[str, Any] | None:
    """The alpha = 0 perplexity of group size ``gs``: the independent base-only GPTQ decomposition when
    it was measured, else the default decomposition with its ortho stream switched off."""
    if f"gptq-g{gs}" in rows:
        return ppl_of(rows[f"gptq-g{gs}"])
    row = rows.get(f"libortho-g{gs}-default-alpha0")
    return None if row is None else row.get("alpha0")


def gap_closed(ppl_a1: float, ppl_gptq: float, ppl_fp: float) -> float | None:
    """Fraction of the GPTQ -> FP32 perplexity gap that alpha = 1 closes (1 = back to FP32)."""
    gap = ppl_gptq - ppl_fp
    return None if abs(gap) < 1e-12 else (ppl_gptq - ppl_a1) / gap


def _pair(rows: dict[str, dict], a: str, b: str, what: str, **meta: Any) -> dict[str, Any] | None:
    ma, mb = (ppl_of(rows[k]) if k in rows else None for k in (a, b))
    if ma is None or mb is None:
        return None
    ci = paired_bootstrap_ppl_diff(ma["block_nll"], mb["block_nll"])
    return {"what": what, "a": a, "b": b, **meta, "ppl_a": ma["ppl"], "ppl_b": mb["ppl"],
            "diff": ci.estimate, "ci_low": ci.low, "ci_high": ci.high, "level": ci.level, "p_value": ci.p_value,
            "n_blocks": len(ma["block_nll"])}


def compare_rows(rows: dict[str, dict], group_sizes: list[int], rhos: list[float]) -> list[dict[str, Any]]:
    """Paired comparisons (PPL_a - PPL_b, 95% percentile bootstrap over blocks) the report needs.

    A configuration counts as significant only after Holm–Bonferroni over all configurations of the
    same question (family-wise error 5%), so a tie tested a dozen times does not produce a winner.
    """
    out = []
    for gs in group_sizes:
        for rho in rhos:
            key = f"libortho-g{gs}-{{}}-{rho:g}-{{}}"
            out.append(_pair(rows, key.format("diag", "residual"), key.format("obs", "residual"),
                             "diag_vs_obs", group_size=gs, rho=rho, values="residual"))
            out.append(_pair(rows, key.format("diag", "optimal"), key.format("obs", "optimal"),
                             "diag_vs_obs", group_size=gs, rho=rho, values="optimal"))
            for sel in ("obs", "diag"):
                out.append(_pair(rows, key.format(sel, "optimal"), key.format(sel, "residual"),
                                 "optimal_vs_residual", group_size=gs, rho=rho, selector=sel))
    out = [c for c in out if c is not None]
    for what in {c["what"] for c in out}:  # Holm over the configurations of each question
        family = [c for c in out if c["what"] == what]
        for c, rejected in zip(family, holm([c["p_value"] for c in family]), strict=True):
            c["holm_family_size"] = len(family)
            c["better"] = ("a" if c["diff"] < 0 else "b") if rejected else "neither (Holm-adjusted)"
    return out


def verdicts(comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    """Count, per question, the configurations where each side is significantly better (Holm); decide.

    A side wins a question only if it is significantly better in more configurations than the other
    and never significantly worse; otherwise the verdict is that the data do not separate them.
    """
    out: dict[str, Any] = {}
    names = {"diag_vs_obs": ("diag", "obs"), "optimal_vs_residual": ("optimal", "residual")}
    for what, (a, b) in names.items():
        cs = [c for c in comparisons if c["what"] == what]
        wins_a = sum(c["better"] == "a" for c in cs)
        wins_b = sum(c["better"] == "b" for c in cs)
        if wins_a > 0 and wins_b == 0:
            decision = a
        elif wins_b > 0 and wins_a == 0:
            decision = b
        else:
            decision = None
        out[what] = {"configs": len(cs), f"{a}_significantly_better": wins_a, f"{b}_significantly_better": wins_b,
                     "neither": len(cs) - wins_a - wins_b, "decision": decision}
    return out


def recompute(path: str) -> None:
    """Recompute the comparisons and verdicts of a saved table in place (e.g. after a statistics fix)."""
    import json
    from pathlib import Path

    from libortho.atomic import atomic_write_json

    tab = json.loads(Path(path).read_text())
    tab["comparisons"] = compare_rows(tab["rows"], tab["args"]["group_sizes"], tab["args"]["rhos"])
    tab["verdicts"] = verdicts(tab["comparisons"])
    atomic_write_json(path, tab)
    print(f"rewrote the comparisons of {path}")


if __name__ == "__main__":
    import sys

    recompute(sys.argv[1])
