"""A reasoning probe the project writes: arithmetic and short multi-step word problems with exact answers.

Seed 002 (section 5.4, "saving the genius") claims that a 3-bit base keeps its reasoning only with
the high-precision ortho stream beside it, measured on GSM8K. GSM8K is out of reach offline and far
beyond a 135M model, so the probe is generated here: each item is a question with one integer
answer, drawn with a seed from families of graded difficulty (two-digit and three-digit sums and
differences, a two-digit by one-digit product, word problems of one to three steps). Items are
split by a hash of their question into ``shots`` (the few-shot examples the prompt shows) and
``heldout`` (scored), so no scored question is ever shown as an example; none of it is ever part of a
calibration set (those are drawn from the public corpora in :mod:`libortho.data.corpora`).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

FAMILIES = ("add2", "sub2", "add3", "mul", "word1", "word2", "word3")
NAMES = ("Anna", "Ben", "Carla", "Dev", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kemal", "Lena",
         "Mira", "Nico", "Omar", "Priya", "Rosa", "Sami", "Tara", "Yusuf")
THINGS = ("apples", "books", "coins", "stamps", "marbles", "pencils", "shells", "cards", "eggs", "stickers")
SPLITS = ("shots", "heldout")


@dataclass(frozen=True)
class Problem:
    """One question, its exact integer answer and the family it came from."""

    question: str
    answer: int
    family: str

    @property
    def split(self) -> str:
        """``shots`` for about one item in twenty (by a hash of the question), else ``heldout``."""
        h = int(hashlib.sha256(self.question.encode()).hexdigest()[:8], 16)
        return "shots" if h % 20 == 0 else "heldout"


def _arith(rng: random.Random, family: str) -> Problem:
    if family == "add2":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return Problem(f"What is {a} + {b}?", a + b, family)
    if family == "sub2":
        a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
        return Problem(f"What is {a} - {b}?", a - b, family)
    if family == "add3":
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return Problem(f"What is {a} + {b}?", a + b, family)
    a, b = rng.randint(11, 99), rng.randint(2, 9)
    return Problem(f"What is {a} * {b}?", a * b, family)


def _word(rng: random.Random, steps: int) -> Problem:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    total = rng.randint(5, 30)
    text = [f"{name} has {total} {thing}."]
    moves = [("buys", 1), ("finds", 1), ("gets", 1), ("gives away", -1), ("loses", -1), ("sells", -1)]
    for _ in range(steps):
        verb, sign = rng.choice(moves if total > 1 else moves[:3])  # nothing left to give away: only gains
        n = rng.randint(2, 15) if sign > 0 else rng.randint(1, min(15, total - 1))
        total += sign * n
        text.append(f"Then {name.split()[0]} {verb} {n}." if len(text) > 1 else f"{name} {verb} {n}.")
    text.append(f"How many {thing} does {name} have now?")
    return Problem(" ".join(text), total, f"word{steps}")


GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    **{f: (lambda rng, f=f: _arith(rng, f)) for f in ("add2", "sub2", "add3", "mul")},
    **{f"word{k}": (lambda rng, k=k: _word(rng, k)) for k in (1, 2, 3)},
}


def reasoning_problems(n: int, split: str = "heldout", seed: int = 0,
                       families: tuple[str, ...] = FAMILIES) -> list[Problem]:
    """``n`` distinct problems of one split, families in turn, reproducible from ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; available: {', '.join(SPLITS)}")
    bad = [f for f in families if f not in GENERATORS]
    if bad or not families:
        raise ValueError(f"unknown problem families {bad or '(none)'}; available: {', '.join(FAMILIES)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"reasoning-{seed}")
    out: list[Problem] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n:
            raise ValueError(f"could not draw {n} distinct {split} problems from families {families}")
        p = GENERATORS[families[len(out) % len(families)]](rng)
        if p.split == split and p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


N_CHOICES = 4


def answer_choices(problem: Problem) -> list[int]:
    """Four candidate answers in increasing order: the true one and three near misses.

    The candidates are an arithmetic run ``a + k * step`` (step 1 or 10) in which the true answer's
    position is uniform over the four (drawn from a hash of the question, so it is fixed per item):
    neither "the middle one" nor "the largest" beats chance. Steps of 10 only where the whole run stays
    non-negative; the few answers below 3 shift their run up instead.
    """
    h = int(hashlib.sha256(f"choices:{problem.question}".encode()).hexdigest()[:8], 16)
    step = 10 if (h >> 4) % 2 and problem.answer >= 10 * (N_CHOICES - 1) else 1
    pos = h % N_CHOICES
    while problem.answer - pos * step < 0:
        pos -= 1
    return [problem.answer + (k - pos) * step for k in range(N_CHOICES)]


def probe_prompt(problem: Problem, shots: list[Problem]) -> str:
    """Plain few-shot text: worked examples as ``Question: ... / Answer: N`` pairs, then the question."""
    head = "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots)
    return f"{head}Question: {problem.question}\nAnswer:"


def shots_by_family(n: int = 3, seed: int = 0, families: tuple[str, ...] = FAMILIES) -> dict[str, list[Problem]]:
    """``n`` examples of each family from the ``shots`` split (never scored)."""
    return {f: reasoning_problems(n, "shots", seed=seed, families=(f,)) for f in families}


_INT = re.compile(r"-?\d[\d,]*")


def parse_answer(text: str) -> int | None:
    """The first integer in a reply (thousands separators allowed), or None."""
    m = _INT.search(text)
    if m is None:
        return None
    digits = m.group(0).replace(",", "")
    return int(digits) if digits not in ("", "-") else None
