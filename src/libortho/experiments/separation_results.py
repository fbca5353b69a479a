"""The separation experiment's result file and the evaluations it lists (torch-free).

Every evaluation is recorded once, in ``seed<S>/evals/<name>.json`` beside ``result.json``. The result
file lists the evaluations of each seed by name instead of repeating them (on SmolLM2 one evaluation,
with every record's attack scores for the bootstrap, is ~150 KB: a full screening inlined would be
~9 MB), and :func:`hydrate` puts them back when the file is read. Result files written before
this layout hold their evaluations inline and are read as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"


def evals_dir(seed: str | int) -> str:
    """Where the evaluations of ``seed`` are recorded, relative to the result file's folder."""
    return f"seed{seed}/evals"


def lean(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` as written to disk: each seed's evaluations by name (a shallow copy; ``result`` is untouched)."""
    seeds = {s: {**sd, "evals": sorted(sd["evals"]), "evals_recorded_in": evals_dir(s)}
             for s, sd in result["seeds"].items()}
    return {**result, "seeds": seeds}


def hydrate(result: dict[str, Any], root: str | Path) -> dict[str, Any]:
    """Each seed's evaluations read back from ``seed<S>/evals/`` under ``root`` (in place; returns ``result``).

    A missing or unreadable evaluation is a one-line error naming the file: a report must never be
    drawn from part of the rows without saying so."""
    for s, sd in result.get("seeds", {}).items():
        if not isinstance(sd.get("evals"), list):
            continue  # written before this layout: evaluations inline
        rel = Path(sd.get("evals_recorded_in", evals_dir(s)))
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"seed {s}: evaluations recorded in {rel}, outside the result's folder")
        where = Path(root) / rel
        entries = {}
        for name in sd["evals"]:
            path = where / f"{name}.json"
            try:
                entries[name] = json.loads(path.read_text(encoding="utf-8"))["entry"]
            except FileNotFoundError:
                raise FileNotFoundError(f"evaluation {name!r} of seed {s} is listed in the result but "
                                        f"{path} is missing") from None
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise ValueError(f"{path} is not a recorded evaluation: {err}") from err
        sd["evals"] = entries
    return result
