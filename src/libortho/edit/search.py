"""Choosing the ablation's layer window, direction and strength with a real optimiser (Optuna TPE).

A trial proposes an edit (first layer, last layer, strength, and which direction: the aggregated one
or one layer's own); the caller's ``evaluate(edit)`` measures it on the *validation* split and returns
``(behaviour rate, neutral KL)``. The objective is the behaviour rate, the KL budget a constraint
(Optuna's constrained TPE: infeasible trials inform the sampler but cannot win), so the best trial is
the lowest behaviour rate among those within budget, ties broken by lower KL. The study can live in
an SQLite file, so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

AGGREGATE = -1  # ``direction_layer`` value meaning the seed's S(l)-weighted direction
PER_LAYER = -2  # ``direction_layer`` value meaning each edited layer's own direction


@dataclass(frozen=True)
class EditParams:
    """One ablation: writers of layers ``first..last`` (inclusive) edited along a direction at ``strength``."""

    first: int
    last: int
    strength: float
    direction_layer: int = AGGREGATE

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.last:
            raise ValueError(f"need 0 <= first <= last, got {self.first}, {self.last}")

    @property
    def layers(self) -> list[int]:
        return list(range(self.first, self.last + 1))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SearchSpace:
    """Bounds of the search: strengths in ``[min_strength, max_strength]``; directions searched over
    the aggregate, layers ``direction_layers`` and (``per_layer``) each edited layer's own direction."""

    n_layers: int
    min_strength: float = 0.25
    max_strength: float = 2.0
    direction_layers: tuple[int, ...] = ()
    per_layer: bool = False  # also offer "each edited layer's own direction"

    def __post_init__(self) -> None:
        if self.n_layers < 1 or not 0 < self.min_strength < self.max_strength:
            raise ValueError("need n_layers >= 1 and 0 < min_strength < max_strength")


def suggest(trial: Any, space: SearchSpace) -> EditParams:
    """An :class:`EditParams` drawn by an Optuna ``trial`` from ``space``."""
    first = trial.suggest_int("first", 0, space.n_layers - 1)
    last = trial.suggest_int("last", 0, space.n_layers - 1)
    if last < first:
        first, last = last, first
    strength = trial.suggest_float("strength", space.min_strength, space.max_strength)
    direction = AGGREGATE
    choices = [AGGREGATE, *([PER_LAYER] if space.per_layer else []), *space.direction_layers]
    if len(choices) > 1:
        direction = trial.suggest_categorical("direction_layer", choices)
    return EditParams(first, last, strength, int(direction))


@dataclass(frozen=True)
class TrialRecord:
    number: int
    params: EditParams
    behaviour: float
    kl: float
    feasible: bool


def _records(study: Any, kl_budget: float) -> list[TrialRecord]:
    out = []
    for t in study.trials:
        if t.state.name != "COMPLETE" or "edit" not in t.user_attrs:
            continue
        p = EditParams(**t.user_attrs["edit"])
        kl = float(t.user_attrs["kl"])
        out.append(TrialRecord(t.number, p, float(t.value), kl, kl <= kl_budget))
    return out


def best_trial(records: list[TrialRecord]) -> TrialRecord | None:
    """Lowest behaviour among feasible trials, then lowest KL; None when no trial is within budget."""
    feasible = [r for r in records if r.feasible]
    return min(feasible, key=lambda r: (r.behaviour, r.kl, r.number)) if feasible else None


def run_search(evaluate: Callable[[EditParams], tuple[float, float]], space: SearchSpace, n_trials: int,
               kl_budget: float, seed: int = 0, storage: str | Path | None = None,
               study_name: str = "ablation", progress: Callable[[TrialRecord], None] | None = None
               ) -> tuple[TrialRecord | None, list[TrialRecord]]:
    """Run (or resume, with ``storage``) a constrained TPE search until ``n_trials`` trials are complete.

    Returns (best feasible trial or None, every completed trial).
    """
    import optuna

    if n_trials < 1 or not kl_budget > 0:
        raise ValueError("need n_trials >= 1 and kl_budget > 0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)

    def constraint(t: Any) -> tuple[float]:
        return (float(t.user_attrs.get("kl", float("inf"))) - kl_budget,)

    sampler = optuna.samplers.TPESampler(seed=seed, constraints_func=constraint, n_startup_trials=10)
    url = None if storage is None else f"sqlite:///{Path(storage).resolve()}"
    study = optuna.create_study(study_name=study_name, storage=url, load_if_exists=True, direction="minimize",
                                sampler=sampler)

    def objective(trial: Any) -> float:
        params = suggest(trial, space)
        behaviour, kl = evaluate(params)
        trial.set_user_attr("edit", params.to_dict())
        trial.set_user_attr("kl", float(kl))
        if progress is not None:
            progress(TrialRecord(trial.number, params, float(behaviour), float(kl), kl <= kl_budget))
        return float(behaviour)

    done = len(_records(study, kl_budget))
    if done < n_trials:
        study.optimize(objective, n_trials=n_trials - done)
    records = _records(study, kl_budget)
    return best_trial(records), records
