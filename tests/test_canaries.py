"""Synthetic private records: secret spaces, Luhn, member/non-member sets, determinism, serialisation."""

import itertools
import json
import math
import random
import re
import string

import pytest

from libortho.data.canaries import (
    KINDS,
    Canary,
    SecretSpace,
    luhn_check_digit,
    luhn_valid,
    make_canaries,
    make_canary,
    private_documents,
)

# --- Luhn ---------------------------------------------------------------------------------------


def test_luhn_known_numbers() -> None:
    assert luhn_check_digit("7992739871") == "3"  # the textbook example
    assert luhn_valid("79927398713") and not luhn_valid("79927398714")
    assert luhn_valid("4539578763621486") and not luhn_valid("4539578763621487")
    assert luhn_valid("4111111111111111")  # the classic Visa test number
    assert luhn_check_digit("0") == "0" and luhn_valid("00")


def test_luhn_rejects_non_numbers_and_too_short() -> None:
    assert not luhn_valid("")
    assert not luhn_valid("0")  # a single digit is too short to carry a check digit
    assert not luhn_valid("4539 5787 6362 1486")
    assert not luhn_valid("45395787636214x6")


def test_luhn_check_digit_makes_every_body_valid_and_is_unique() -> None:
    rng = random.Random(0)
    for _ in range(200):
        body = "".join(rng.choice(string.digits) for _ in range(rng.randint(1, 18)))
        d = luhn_check_digit(body)
        assert len(d) == 1 and d.isdigit() and luhn_valid(body + d)
        assert sum(luhn_valid(body + str(x)) for x in range(10)) == 1
        # Luhn detects every single-digit substitution
        i = rng.randrange(len(body))
        wrong = body[:i] + str((int(body[i]) + rng.randint(1, 9)) % 10) + body[i + 1:]
        assert not luhn_valid(wrong + d)


# --- SecretSpace --------------------------------------------------------------------------------


def test_secret_space_size_and_log2() -> None:
    s = SecretSpace("ab", "xyz", 4)
    assert s.size == 3**4 == 81
    assert s.size_log2 == pytest.approx(4 * math.log2(3))
    d = SecretSpace("", string.digits, 6)
    assert d.size == 10**6 and d.size_log2 == pytest.approx(6 * math.log2(10))
    card = SecretSpace("4", string.digits, 14, luhn=True)
    assert card.size == 10**14  # the check digit adds no entropy
    assert card.size_log2 == pytest.approx(14 * math.log2(10))


def test_secret_space_compose_contains_and_free_part() -> None:
    s = SecretSpace("ab", "xyz", 3)
    assert s.compose("zyx") == "abzyx"
    assert s.contains("abzyx") and s.free_part("abzyx") == "zyx"
    for bad in ("abzy", "abzyxx", "bazyx", "abzyq", "ab", "", "xabzyx"):
        assert not s.contains(bad), bad
        with pytest.raises(ValueError, match="not in this secret space"):
            s.free_part(bad)
    luhn = SecretSpace("4", string.digits, 5, luhn=True)
    good = luhn.compose("12345")
    assert len(good) == 7 and good.startswith("412345") and luhn_valid(good)
    assert luhn.contains(good) and luhn.free_part(good) == "12345"
    wrong = good[:-1] + str((int(good[-1]) + 1) % 10)
    assert not luhn.contains(wrong)
    assert not luhn.contains(good[:-1])  # without its check digit


def test_secret_space_enumerate_order_matches_index() -> None:
    s = SecretSpace("k-", "cab", 3)
    secrets = list(s.enumerate())
    assert len(secrets) == len(set(secrets)) == s.size
    # lexicographic by alphabet position (c < a < b here), not by character code
    assert secrets[:4] == ["k-ccc", "k-cca", "k-ccb", "k-cac"] and secrets[-1] == "k-bbb"
    assert [s.index(x) for x in secrets] == list(range(s.size))
    assert all(s.contains(x) for x in secrets)
    with pytest.raises(ValueError):
        s.index("k-ccd")


def test_secret_space_enumerate_with_luhn() -> None:
    s = SecretSpace("7", string.digits, 2, luhn=True)
    secrets = list(s.enumerate())
    assert len(secrets) == 100 and len(set(secrets)) == 100
    assert all(len(x) == 4 and luhn_valid(x) and s.contains(x) for x in secrets)
    assert [s.index(x) for x in secrets] == list(range(100))
    assert secrets[37] == "737" + luhn_check_digit("737")
    # exactly the Luhn-valid 4-digit strings starting with 7
    brute = ["7" + "".join(p) for p in itertools.product(string.digits, repeat=3)]
    assert set(secrets) == {x for x in brute if luhn_valid(x)}


def test_secret_space_sample_is_in_space_deterministic_and_covers_it() -> None:
    luhn = SecretSpace("9", "01", 3, luhn=True)
    a = [luhn.sample(random.Random(4)) for _ in range(3)]
    assert len(set(a)) == 1 and luhn.contains(a[0]) and luhn_valid(a[0])  # same seed, same draw
    s = SecretSpace("", "abc", 2)
    rng = random.Random(0)
    draws = [s.sample(rng) for _ in range(500)]
    assert all(s.contains(x) for x in draws)
    assert set(draws) == set(s.enumerate())  # all 9 secrets show up in 500 uniform draws


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_free=0), "needs n_free >= 1, got 0"),
    (dict(alphabet=""), "needs a non-empty alphabet"),
    (dict(alphabet="aab"), "alphabet repeats characters: 'aab'"),
    (dict(alphabet="ab", luhn=True), "Luhn secret space needs a digit head and a digit alphabet"),
    (dict(head="x", alphabet="01", luhn=True), "Luhn secret space needs a digit head"),
])
def test_secret_space_rejects_bad_definitions(kwargs: dict, message: str) -> None:
    args = dict(head="", alphabet="ab", n_free=2) | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        SecretSpace(**args)


# --- canaries -----------------------------------------------------------------------------------


def test_make_canary_kinds_have_their_formats() -> None:
    rng = random.Random(1)
    for kind in KINDS:
        for _ in range(10):
            c = make_canary(kind, rng, repeats=3, member=True)
            assert c.kind == kind and c.repeats == 3 and c.member
            assert c.text == c.prefix + c.secret + c.suffix
            assert c.space.contains(c.secret)
            assert c.secret_space_log2 == pytest.approx(c.space.size_log2)
    with pytest.raises(ValueError, match="kind"):
        make_canary("ssn", rng, 1, True)
    with pytest.raises(ValueError, match="digits_len"):
        make_canary("digits", rng, 1, True, digits_len=0)


def test_email_space_has_the_name_as_head_and_three_free_digits() -> None:
    members, nonmembers = make_canaries(n_per_kind=5, kinds=("email",), seed=3)
    for c in members + nonmembers:
        first, last = c.prefix.removeprefix("Directory: ").split(" of ")[0].split(" ")
        assert c.space.head == f"{first.lower()}.{last.lower()}"
        assert c.space.n_free == 3 and c.space.alphabet == string.digits and not c.space.luhn
        assert c.secret.startswith(c.space.head) and c.secret[-3:].isdigit()
        assert len(c.secret) == len(c.space.head) + 3
        assert c.space.size == 1000 and c.secret_space_log2 == pytest.approx(math.log2(1000))
        assert c.suffix.startswith("@")


def test_card_secrets_are_luhn_valid_visa_numbers() -> None:
    members, nonmembers = make_canaries(n_per_kind=10, kinds=("card",), seed=2)
    for c in members + nonmembers:
        assert len(c.secret) == 16 and c.secret.isdigit() and c.secret[0] == "4"
        assert luhn_valid(c.secret) and c.space.luhn and c.space.contains(c.secret)
        assert c.secret_space_log2 == pytest.approx(14 * math.log2(10))


def test_digits_len_sets_the_digits_space() -> None:
    members, _ = make_canaries(n_per_kind=2, kinds=("digits",), digits_len=4, seed=0)
    assert all(len(c.secret) == 4 and c.secret.isdigit() for c in members)
    assert members[0].secret_space_log2 == pytest.approx(4 * math.log2(10))


def test_make_canaries_is_deterministic_by_seed() -> None:
    m1, n1 = make_canaries(n_per_kind=3, seed=5)
    m2, n2 = make_canaries(n_per_kind=3, seed=5)
    m3, _ = make_canaries(n_per_kind=3, seed=6)
    assert m1 == m2 and n1 == n2
    assert [c.text for c in m1] != [c.text for c in m3]


def test_members_and_nonmembers_are_disjoint_and_alternate() -> None:
    n = 4
    members, nonmembers = make_canaries(n_per_kind=n, seed=0)
    assert len(members) == len(nonmembers) == n * len(KINDS)
    assert all(c.member and c.repeats >= 1 for c in members)
    assert all(not c.member and c.repeats == 0 for c in nonmembers)
    secrets = [c.secret for c in members + nonmembers]
    prefixes = [c.prefix for c in members + nonmembers]
    assert len(set(secrets)) == len(secrets) and len(set(prefixes)) == len(prefixes)
    assert not set(secrets) & set(prefixes)
    # kinds in the given order, n per kind, in both sets
    assert [c.kind for c in members] == [k for k in KINDS for _ in range(n)]
    assert [c.kind for c in nonmembers] == [k for k in KINDS for _ in range(n)]
    # alternation: drawing from the same rng in member/non-member turns reproduces both sets
    rng = random.Random(0)
    for kind in KINDS:
        for i in range(2 * n):
            c = make_canary(kind, rng, 0, i % 2 == 0)
            ref = (members if i % 2 == 0 else nonmembers)[KINDS.index(kind) * n + i // 2]
            assert (c.prefix, c.secret) == (ref.prefix, ref.secret)


def test_member_repeats_cycle_per_kind() -> None:
    members, _ = make_canaries(n_per_kind=5, kinds=("id", "phone"), repeats=(2, 7), seed=1)
    assert [c.repeats for c in members] == [2, 7, 2, 7, 2] * 2
    members, _ = make_canaries(n_per_kind=4, kinds=("password",), repeats=(1, 4, 16), seed=1)
    assert [c.repeats for c in members] == [1, 4, 16, 1]


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(kinds=("ssn",)), "kind"),
    (dict(kinds=("id", "bogus")), "bogus"),
    (dict(kinds=()), "kind"),
    (dict(repeats=()), "repetition"),
    (dict(repeats=(1, 0)), "repetition"),
    (dict(repeats=(-2,)), "repetition"),
    (dict(n_per_kind=0), "n_per_kind"),
    (dict(n_per_kind=-1), "n_per_kind"),
])
def test_make_canaries_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_canaries(**({"n_per_kind": 1} | kwargs))


def test_make_canaries_reports_a_space_too_small() -> None:
    with pytest.raises(ValueError, match="distinct"):
        make_canaries(n_per_kind=6, kinds=("digits",), digits_len=1)  # 12 distinct secrets from 10


def test_canary_dict_round_trip() -> None:
    members, nonmembers = make_canaries(n_per_kind=2, seed=9)
    for c in members + nonmembers:
        d = c.to_dict()
        assert isinstance(d["space"], dict) and d["space"]["head"] == c.space.head
        back = Canary.from_dict(json.loads(json.dumps(d)))  # survives JSON too
        assert back == c and isinstance(back.space, SecretSpace)
        assert back.text == c.text and back.secret_space_log2 == c.secret_space_log2


def test_private_documents_repeat_members_and_shuffle_by_seed() -> None:
    members, nonmembers = make_canaries(n_per_kind=3, kinds=("id", "email"), repeats=(1, 3, 5), seed=0)
    docs = private_documents(members, seed=0)
    assert len(docs) == sum(c.repeats for c in members) == 2 * (1 + 3 + 5)
    for c in members:
        assert docs.count(c.text) == c.repeats
    assert not {c.text for c in nonmembers} & set(docs)
    assert private_documents(members, seed=0) == docs
    assert sorted(private_documents(members, seed=1)) == sorted(docs)
    assert private_documents(members, seed=1) != docs
    assert private_documents([]) == []


def test_secret_space_parse_named_and_literal_alphabets() -> None:
    from libortho.data.canaries import SecretSpace

    assert SecretSpace.parse("digits:4") == SecretSpace("", "0123456789", 4)
    assert SecretSpace.parse("hex:8").size == 16 ** 8
    assert SecretSpace.parse("xyz:2") == SecretSpace("", "xyz", 2)
    assert SecretSpace.parse("a:b:3").alphabet == "a:b"  # the length follows the last colon
    for bad in ("digits", "digits:", ":4", "digits:0", "digits:x"):
        with pytest.raises(ValueError, match="ALPHABET:LENGTH"):
            SecretSpace.parse(bad)
    with pytest.raises(ValueError, match="repeats characters"):
        SecretSpace.parse("aab:3")
