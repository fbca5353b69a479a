"""The ablation search (Optuna constrained TPE) on cheap synthetic objectives: the KL budget is a hard
constraint, the best trial is the lowest behaviour within budget, and an SQLite study resumes."""

from __future__ import annotations

import pytest

from libortho.edit.search import AGGREGATE, EditParams, SearchSpace, best_trial, run_search

N_LAYERS = 6
SPACE = SearchSpace(N_LAYERS, min_strength=0.25, max_strength=2.0, direction_layers=(1, 3))


class Synthetic:
    """Behaviour falls with strength and window width; KL rises with both (so the two pull apart)."""

    def __init__(self, kl_scale: float = 0.05) -> None:
        self.kl_scale = kl_scale
        self.calls: list[tuple[EditParams, float, float]] = []

    def __call__(self, p: EditParams) -> tuple[float, float]:
        width = p.last - p.first + 1
        behaviour = 1.0 / (1.0 + p.strength * width)
        kl = self.kl_scale * p.strength * width
        self.calls.append((p, behaviour, kl))
        return behaviour, kl


def _check_params(p: EditParams) -> None:
    assert 0 <= p.first <= p.last < N_LAYERS
    assert SPACE.min_strength <= p.strength <= SPACE.max_strength
    assert p.direction_layer in (AGGREGATE, *SPACE.direction_layers)


def test_best_is_the_lowest_behaviour_within_the_kl_budget() -> None:
    ev, budget = Synthetic(), 0.2
    best, records = run_search(ev, SPACE, n_trials=20, kl_budget=budget, seed=0)
    assert len(ev.calls) == 20 and len(records) == 20
    for p, _, _ in ev.calls:
        _check_params(p)
    # the records are what evaluate returned, with feasibility judged against the budget
    by_params = {(p.first, p.last, p.strength, p.direction_layer): (b, k) for p, b, k in ev.calls}
    for r in records:
        b, k = by_params[(r.params.first, r.params.last, r.params.strength, r.params.direction_layer)]
        assert r.behaviour == pytest.approx(b) and r.kl == pytest.approx(k)
        assert r.feasible == (k <= budget)
    feasible = [(b, k) for _, b, k in ev.calls if k <= budget]
    infeasible = [(b, k) for _, b, k in ev.calls if k > budget]
    assert feasible and infeasible, "the objective should give both kinds of trial"
    assert best is not None
    assert best.kl <= budget and best.feasible
    assert best.behaviour == pytest.approx(min(b for b, _ in feasible))
    # the constraint matters: some trial over budget had a lower behaviour than the winner
    assert min(b for b, _ in infeasible) < best.behaviour


def test_no_feasible_trial_gives_no_best() -> None:
    calls = []

    def evaluate(p: EditParams) -> tuple[float, float]:
        calls.append(p)
        return 0.0, 1.0  # perfect behaviour, always over budget

    best, records = run_search(evaluate, SPACE, n_trials=4, kl_budget=0.1, seed=0)
    assert best is None
    assert len(calls) == 4 and len(records) == 4
    assert not any(r.feasible for r in records)


def test_ties_in_behaviour_are_broken_by_lower_kl() -> None:
    def evaluate(p: EditParams) -> tuple[float, float]:
        return 0.0, 0.01 * p.strength

    best, records = run_search(evaluate, SPACE, n_trials=6, kl_budget=1.0, seed=0)
    assert best is not None
    assert best.kl == pytest.approx(min(r.kl for r in records))
    assert best.params.strength == pytest.approx(min(r.params.strength for r in records))


def test_search_resumes_from_its_sqlite_study(tmp_path) -> None:
    db = tmp_path / "search.db"
    ev = Synthetic()
    best1, records1 = run_search(ev, SPACE, n_trials=5, kl_budget=0.2, seed=0, storage=db)
    assert len(ev.calls) == 5 and len(records1) == 5 and db.is_file()

    again = Synthetic()
    best2, records2 = run_search(again, SPACE, n_trials=5, kl_budget=0.2, seed=0, storage=db)
    assert again.calls == []  # nothing re-evaluated
    assert [(r.number, r.params, r.behaviour, r.kl) for r in records2] == \
        [(r.number, r.params, r.behaviour, r.kl) for r in records1]
    assert (best1 is None) == (best2 is None)
    if best1 is not None:
        assert best2.number == best1.number and best2.params == best1.params

    more = Synthetic()
    seen = []
    _, records3 = run_search(more, SPACE, n_trials=8, kl_budget=0.2, seed=0, storage=db, progress=seen.append)
    assert len(more.calls) == 3 and len(seen) == 3  # only the difference
    assert len(records3) == 8
    assert sorted(r.number for r in records3) == list(range(8))
    assert [r.params for r in records3[:5]] == [r.params for r in records1]


def test_progress_sees_every_trial_with_its_feasibility() -> None:
    ev, seen = Synthetic(), []
    run_search(ev, SPACE, n_trials=4, kl_budget=0.2, seed=1, progress=seen.append)
    assert len(seen) == 4
    for r, (p, b, k) in zip(seen, ev.calls, strict=True):
        assert r.params == p and r.behaviour == pytest.approx(b) and r.kl == pytest.approx(k)
        assert r.feasible == (k <= 0.2)


def test_edit_params_and_space_validation() -> None:
    with pytest.raises(ValueError):
        EditParams(3, 2, 1.0)
    with pytest.raises(ValueError):
        EditParams(-1, 2, 1.0)
    p = EditParams(2, 4, 0.5)
    assert p.layers == [2, 3, 4] and p.direction_layer == AGGREGATE
    assert EditParams(**p.to_dict()) == p
    assert EditParams(3, 3, 1.0).layers == [3]
    for bad in (dict(n_layers=0), dict(n_layers=4, min_strength=0.0), dict(n_layers=4, min_strength=2.0,
                                                                          max_strength=1.0)):
        with pytest.raises(ValueError):
            SearchSpace(**bad)
    with pytest.raises(ValueError):
        run_search(Synthetic(), SPACE, n_trials=0, kl_budget=0.1)
    with pytest.raises(ValueError):
        run_search(Synthetic(), SPACE, n_trials=2, kl_budget=0.0)


def test_best_trial_of_hand_made_records() -> None:
    from libortho.edit.search import TrialRecord

    p = EditParams(0, 1, 1.0)
    recs = [TrialRecord(0, p, 0.0, 0.5, False), TrialRecord(1, p, 0.2, 0.05, True),
            TrialRecord(2, p, 0.1, 0.09, True), TrialRecord(3, p, 0.1, 0.02, True)]
    assert best_trial(recs).number == 3
    assert best_trial(recs[:1]) is None
    assert best_trial([]) is None
