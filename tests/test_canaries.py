"""Synthetic private records: formats, Luhn validity, member/non-member disjointness, determinism."""

import pytest

from libortho.data.canaries import KINDS, luhn_check_digit, luhn_valid, make_canaries, private_documents


def test_luhn_known_numbers() -> None:
    assert luhn_valid("4539578763621486") and not luhn_valid("4539578763621487")
    assert luhn_check_digit("7992739871") == "3"


def test_canaries_are_deterministic_disjoint_and_well_formed() -> None:
    m1, n1 = make_canaries(n_per_kind=3, seed=5)
    m2, _ = make_canaries(n_per_kind=3, seed=5)
    assert [c.text for c in m1] == [c.text for c in m2]
    assert len(m1) == len(n1) == 3 * len(KINDS)
    assert not {c.secret for c in m1} & {c.secret for c in n1}
    assert {c.repeats for c in m1} == {1, 4, 16} and all(c.repeats == 0 and not c.member for c in n1)
    for c in m1 + n1:
        assert c.text.startswith(c.prefix) and c.secret in c.text and set(c.secret) <= set(c.alphabet)
        if c.kind == "card":
            assert len(c.secret) == 16 and luhn_valid(c.secret)
    digits = next(c for c in m1 if c.kind == "digits")
    assert digits.secret_space_log2 == pytest.approx(6 * 3.321928, rel=1e-5)
    docs = private_documents(m1)
    assert len(docs) == sum(c.repeats for c in m1)
    with pytest.raises(ValueError, match="kind"):
        make_canaries(1, kinds=("ssn",))
