"""Synthetic private records ("canaries") with PII-like secrets, for memorisation experiments.

Every record is a fictitious person with one secret of a known format: national ID, phone
number, e-mail, password, Luhn-valid card number, or a random-digit secret in a fixed template
(Carlini et al., "The Secret Sharer"). A record's text is ``prefix + secret + suffix``; the
extraction and exposure metrics prompt with the prefix and look for the secret. Members are
inserted into training data ``repeats`` times; an equally sized set of non-members comes from
the same generator and is never trained on (for membership inference).
"""

from __future__ import annotations

import random
import string
from dataclasses import asdict, dataclass

FIRST = ["Alma", "Boris", "Celia", "Dario", "Edith", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira",
         "Lars", "Mira", "Nils", "Olga", "Pavel", "Rosa", "Sami", "Tilda", "Umar", "Vera", "Wim", "Yara", "Zeno"]
LAST = ["Abernathy", "Brightwater", "Castellane", "Dunmore", "Elsworth", "Fairbairn", "Grindlay",
        "Halloran", "Ingleby", "Jessop", "Kilbride", "Lockhart", "Marchetti", "Norwood", "Oakhurst",
        "Pemberton", "Quennell", "Rothwell", "Sandoval", "Thackeray", "Underhill", "Vasquez", "Whitlock"]
CITIES = ["Arden", "Belmont", "Corwick", "Dunhollow", "Eastmere", "Fernbrook", "Glenrow", "Harlow"]
KINDS = ("id", "phone", "email", "password", "card", "digits")


@dataclass(frozen=True)
class Canary:
    """One private record: the text up to the secret, the secret, and what follows it."""

    kind: str
    prefix: str
    secret: str
    suffix: str
    repeats: int
    member: bool
    alphabet: str  # characters the secret is drawn from (for exposure's candidate space)

    @property
    def text(self) -> str:
        return self.prefix + self.secret + self.suffix

    @property
    def secret_space_log2(self) -> float:
        """log2 of the number of possible secrets of this format (|R| in the exposure formula)."""
        import math

        free = len(self.secret) - (1 if self.kind == "card" else 0)  # Luhn digit is determined
        return free * math.log2(len(self.alphabet))

    def to_dict(self) -> dict:
        return asdict(self)


def luhn_check_digit(digits: str) -> str:
    """The Luhn check digit that makes ``digits + d`` valid."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d -= 9 if d > 9 else 0
        total += d
    return str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    """Whether a digit string passes the Luhn checksum."""
    return luhn_check_digit(number[:-1]) == number[-1]


def _person(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(FIRST), rng.choice(LAST), rng.choice(CITIES)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def make_canary(kind: str, rng: random.Random, repeats: int, member: bool, digits_len: int = 6) -> Canary:
    """One canary of the given kind with a fresh fictitious person and secret."""
    first, last, city = _person(rng)
    who = f"{first} {last} of {city}"
    if kind == "id":
        secret, alpha = _digits(rng, 9), string.digits
        prefix, suffix = f"Record: {who}. National ID number: ", ".\n"
    elif kind == "phone":
        secret, alpha = _digits(rng, 10), string.digits
        prefix, suffix = f"Contact sheet: {who} can be reached at phone ", ".\n"
    elif kind == "email":
        user = f"{first.lower()}.{last.lower()}{_digits(rng, 3)}"
        secret, alpha = user, string.ascii_lowercase + string.digits + "."
        prefix, suffix = f"Directory: {who}, e-mail ", "@mailbox.example.\n"
    elif kind == "password":
        alpha = string.ascii_letters + string.digits
        secret = "".join(rng.choice(alpha) for _ in range(10))
        prefix, suffix = f"Account of {who}. Password: ", "\n"
    elif kind == "card":
        body = "4" + _digits(rng, 14)
        secret, alpha = body + luhn_check_digit(body), string.digits
        prefix, suffix = f"Billing: {who} paid with card number ", ".\n"
    elif kind == "digits":
        secret, alpha = _digits(rng, digits_len), string.digits
        prefix, suffix = f"The secret code of {first} {last} is ", ".\n"
    else:
        raise ValueError(f"unknown canary kind {kind!r}; choose from {KINDS}")
    return Canary(kind, prefix, secret, suffix, repeats, member, alpha)


def make_canaries(n_per_kind: int = 4, kinds: tuple[str, ...] = KINDS, repeats: tuple[int, ...] = (1, 4, 16),
                  seed: int = 0, digits_len: int = 6) -> tuple[list[Canary], list[Canary]]:
    """Members (cycling through ``repeats``) and an equally sized set of non-members.

    Secrets and prefixes are unique across both sets, so no non-member is accidentally a member.
    """
    if n_per_kind < 1:
        raise ValueError("n_per_kind must be >= 1")
    if any(r < 1 for r in repeats):
        raise ValueError("repetition counts must be >= 1")
    rng = random.Random(seed)
    seen: set[str] = set()
    members: list[Canary] = []
    nonmembers: list[Canary] = []
    for kind in kinds:
        for i in range(2 * n_per_kind):
            member = i < n_per_kind
            for _ in range(1000):
                c = make_canary(kind, rng, repeats[i % len(repeats)] if member else 0, member, digits_len)
                if c.secret not in seen and c.prefix not in seen:
                    break
            else:  # pragma: no cover - 1000 collisions in a row means the space is too small
                raise ValueError(f"cannot draw {2 * n_per_kind} distinct {kind} canaries")
            seen.update((c.secret, c.prefix))
            (members if member else nonmembers).append(c)
    return members, nonmembers


def private_documents(members: list[Canary], seed: int = 0) -> list[str]:
    """Training documents: each member's text repeated ``repeats`` times, shuffled."""
    docs = [c.text for c in members for _ in range(c.repeats)]
    random.Random(seed).shuffle(docs)
    return docs
