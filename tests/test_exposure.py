"""Exposure: ranks, cached scoring, char-wise enumeration and the skew-normal estimate, against slow references.

``OracleLM`` is a deterministic causal LM whose "key/value cache" is the token history itself: after any
prefix of a record it was given it puts (by far) the largest logit on that record's next token, and
elsewhere its logits are a pseudo-random function of the *whole* history (or exactly uniform). It is
imported by ``test_extraction`` and ``test_harness`` as well.
"""

import itertools
import math
import string
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from libortho.data.canaries import ALNUM, Canary, SecretSpace, make_canaries
from libortho.data.records import record_ids
from libortho.eval import exposure as ex
from libortho.eval.exposure import (
    CharLayout,
    ExposureResult,
    canary_exposure,
    char_layout,
    enumerate_charwise,
    estimated_exposure,
    exact_exposure,
    exposure_from_rank,
    mid_rank,
    score_continuations,
    skewnorm_exposure,
)

SEP = 257


class HistoryCache:
    """The minimal cache contract of the exposure code: deep-copyable, batch-repeatable, holds the history."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def batch_repeat_interleave(self, n: int) -> None:
        self.tokens = self.tokens.repeat_interleave(n, dim=0)


class OracleLM(nn.Module):
    """Deterministic causal LM over ``vocab`` tokens that has memorised ``records`` (lists of token ids).

    After a history that is a proper prefix of a record, the record's next token gets the largest logit
    plus ``confidence``; otherwise the logits are ``noise`` times a pseudo-random vector seeded by the
    whole history (``noise=0``: exactly uniform).
    """

    def __init__(self, records: list[list[int]] = (), vocab: int = 259, confidence: float = 15.0,
                 noise: float = 1.0) -> None:
        super().__init__()
        self.records = [tuple(r) for r in records]
        self.vocab, self.confidence, self.noise = vocab, confidence, noise
        self.calls = 0
        self.generate_kwargs: list[dict] = []

    def next_logits(self, hist: tuple[int, ...]) -> torch.Tensor:
        if self.noise:
            seed = zlib.crc32(np.asarray(hist, dtype=np.int64).tobytes())
            out = self.noise * torch.randn(self.vocab, generator=torch.Generator().manual_seed(seed))
        else:
            out = torch.zeros(self.vocab)
        for r in self.records:
            if len(hist) < len(r) and r[: len(hist)] == hist:
                out[r[len(hist)]] = out.max() + self.confidence
                break
        return out

    def forward(self, input_ids, past_key_values=None, use_cache=False, attention_mask=None, **_):
        self.calls += 1
        past = input_ids[:, :0] if past_key_values is None else past_key_values.tokens
        if past.shape[0] != input_ids.shape[0]:
            raise ValueError(f"cache batch {past.shape[0]} != input batch {input_ids.shape[0]}")
        full = torch.cat([past, input_ids], dim=1)
        t0 = past.shape[1]
        rows = full.tolist()
        logits = torch.stack([torch.stack([self.next_logits(tuple(row[: t0 + t + 1]))
                                           for t in range(input_ids.shape[1])]) for row in rows])
        cache = None
        if use_cache:
            cache = past_key_values if past_key_values is not None else HistoryCache(full)
            cache.tokens = full
        return SimpleNamespace(logits=logits, past_key_values=cache)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        """Greedy decoding of left-padded prompts (what ``extract`` asks of Hugging Face ``generate``)."""
        self.generate_kwargs.append(dict(kw, max_new_tokens=max_new_tokens))
        new = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            hist = [t for t, m in zip(ids, mask, strict=True) if m]
            out = []
            for _ in range(max_new_tokens):
                out.append(int(self.next_logits(tuple(hist)).argmax()))
                hist.append(out[-1])
            new.append(out)
        return torch.cat([input_ids, torch.tensor(new, dtype=torch.long)], dim=1)


def oracle_for(tokenizer, canaries: list[Canary], **kw) -> OracleLM:
    """An oracle that has memorised ``[SEP] + tokens(text)`` of every canary."""
    return OracleLM(record_ids(tokenizer, [c.text for c in canaries]), **kw)


@torch.no_grad()
def slow_logprobs(model: nn.Module, seqs: list[list[int]], start: int) -> torch.Tensor:
    """Sum of log p(s[t] | s[:t]) for t >= start of each sequence: full forward passes without any cache
    (sequences of equal length share one batch, so there is no padding), float64."""
    out = torch.empty(len(seqs), dtype=torch.float64)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(len(s), []).append(i)
    for idx in by_len.values():
        ids = torch.tensor([seqs[i] for i in idx])
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.double(), dim=-1)
        for row, i in enumerate(idx):
            out[i] = sum(float(logp[row, t - 1, seqs[i][t]]) for t in range(start, len(seqs[i])))
    return out


def slow_candidate_scores(model: nn.Module, tokenizer, canary: Canary, after_head: bool = False) -> torch.Tensor:
    """log p(candidate | SEP + prefix) for every candidate of the space, in enumeration order (with
    ``after_head``, only the characters after the space's fixed head are scored)."""
    pre = [SEP, *tokenizer.encode(canary.prefix + (canary.space.head if after_head else ""))]
    skip = len(canary.space.head) if after_head else 0
    return slow_logprobs(model, [pre + tokenizer.encode(s[skip:]) for s in canary.space.enumerate()], len(pre))


def slow_rank(scores: torch.Tensor, idx: int) -> float:
    s = float(scores[idx])
    others = [float(x) for i, x in enumerate(scores) if i != idx]
    return 1 + sum(o > s for o in others) + 0.5 * sum(o == s for o in others)


def custom_canary(secret: str, space: SecretSpace, prefix: str = "The secret code of Alma Lockhart is ") -> Canary:
    return Canary("digits", prefix, secret, ".\n", 1, True, space)


@pytest.fixture(scope="module")
def canaries():
    """Digits (|R| = 100) and e-mail (|R| = 1000, head first.last) members plus non-members."""
    members, nonmembers = make_canaries(n_per_kind=1, kinds=("digits", "email"), digits_len=2, seed=3)
    return members, nonmembers


# --------------------------------------------------------------------------------------------- rank arithmetic


def test_exposure_from_rank_known_answers() -> None:
    assert exposure_from_rank(1, 10.0) == 10.0
    assert exposure_from_rank(8, 10.0) == pytest.approx(7.0)
    assert exposure_from_rank(1024, 10.0) == pytest.approx(0.0)
    assert exposure_from_rank(50.5, math.log2(100)) == pytest.approx(math.log2(100) - math.log2(50.5))
    with pytest.raises(ValueError, match="rank"):
        exposure_from_rank(0.5, 10.0)


def test_mid_rank_known_answers() -> None:
    assert mid_rank(0.5, torch.tensor([1.0, 0.5, 0.5, 0.2])) == 3.0  # 1 + 1 above + 2 ties / 2
    assert mid_rank(2.0, torch.tensor([1.0, 0.5])) == 1.0
    assert mid_rank(-9.0, torch.tensor([1.0, 0.5])) == 3.0
    assert mid_rank(0.0, torch.tensor([])) == 1.0
    assert mid_rank(1.0, torch.ones(99)) == 50.5  # (|R| + 1) / 2 with |R| = 100
    # compared in float64: a float32 tensor that rounds the secret's score is not a tie
    assert mid_rank(0.1, torch.tensor([0.1], dtype=torch.float64)) == 1.5


# --------------------------------------------------------------------------------------------- score_continuations


@pytest.mark.parametrize("which", ["llama", "oracle"])
def test_score_continuations_matches_slow_full_forward(tiny_llama, byte_tokenizer, which) -> None:
    model = tiny_llama if which == "llama" else OracleLM([[SEP, 72, 105, 32, 5, 6, 7]], noise=1.0)
    context = [SEP, *byte_tokenizer.encode("Hi ")]
    conts = [[5], [5, 6], [5, 6, 7, 8], [9, 10], [5, 6, 7], [200]]
    got = score_continuations(model, context, conts, batch_size=4)
    ref = slow_logprobs(model, [context + c for c in conts], len(context))
    assert got.dtype == torch.float64 and got.shape == (len(conts),)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # a precomputed cache gives the same scores and is left intact for the next call
    cache = ex.prefix_cache(model, context)
    for _ in range(2):
        torch.testing.assert_close(score_continuations(model, context, conts, batch_size=2, cache=cache), got,
                                   atol=1e-6, rtol=0)
    if which == "oracle":  # the memorised continuation (and its prefixes) are near-certain, deviations are not
        assert float(got[:2].min()) > -1e-4 and float(got[4]) > -1e-4
        assert float(got[3]) < -5 and float(got[5]) < -5 and float(got[2]) < float(got[4]) - 1


def test_score_continuations_rejects_empty(tiny_llama) -> None:
    with pytest.raises(ValueError, match="continuation"):
        score_continuations(tiny_llama, [SEP, 1], [])
    with pytest.raises(ValueError, match="continuation"):
        score_continuations(tiny_llama, [SEP, 1], [[1], []])


# --------------------------------------------------------------------------------------------- char_layout


def test_char_layout_with_byte_tokenizer(byte_tokenizer, canaries) -> None:
    members, _ = canaries
    digits = next(c for c in members if c.kind == "digits")
    lay = char_layout(byte_tokenizer, digits)
    assert lay == CharLayout([SEP, *digits.prefix.encode()], [], [ord(c) for c in string.digits])
    email = next(c for c in members if c.kind == "email")
    lay = char_layout(byte_tokenizer, email)
    assert lay is not None and lay.char_tokens == [ord(c) for c in string.digits]
    # the fixed head (first.last) is shared by every candidate: it lies in the context or the head
    assert lay.context + lay.head == [SEP, *(email.prefix + email.space.head).encode()]
    pw = custom_canary("aZ9", SecretSpace("", ALNUM, 3))
    assert char_layout(byte_tokenizer, pw).char_tokens == [ord(c) for c in ALNUM]


def test_char_layout_declines_luhn_and_merging_tokenizers(byte_tokenizer) -> None:
    card = make_canaries(n_per_kind=1, kinds=("card",), seed=0)[0][0]
    assert char_layout(byte_tokenizer, card) is None

    class MergingTokenizer:
        """Bytes, except that "12" is one token (300): characters are not context-free tokens."""

        eos_token_id = SEP

        def encode(self, text, add_special_tokens=False, **_):
            out, b = [], text.encode()
            i = 0
            while i < len(b):
                if b[i:i + 2] == b"12":
                    out.append(300)
                    i += 2
                else:
                    out.append(b[i])
                    i += 1
            return out

    c = custom_canary("345", SecretSpace("", string.digits, 3))
    assert char_layout(byte_tokenizer, c) is not None
    assert char_layout(MergingTokenizer(), c) is None


# --------------------------------------------------------------------------------------------- enumeration


def test_enumerate_charwise_equals_slow_loop_and_generic_scoring(tiny_llama, byte_tokenizer, canaries) -> None:
    members, _ = canaries
    digits = next(c for c in members if c.kind == "digits")  # n_free = 2, |R| = 100
    lay = char_layout(byte_tokenizer, digits)
    fast = enumerate_charwise(tiny_llama, lay, digits.space.n_free, batch_size=7)
    slow = slow_candidate_scores(tiny_llama, byte_tokenizer, digits)
    assert fast.shape == (100,) and fast.dtype == torch.float64
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    torch.testing.assert_close(enumerate_charwise(tiny_llama, lay, 2, batch_size=256), fast, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["digits3", "email", "one_char"])
def test_enumerate_charwise_equals_generic_scoring(tiny_llama, byte_tokenizer, canaries, kind) -> None:
    if kind == "digits3":
        c = make_canaries(n_per_kind=1, kinds=("digits",), digits_len=3, seed=1)[0][0]
    elif kind == "email":
        c = next(c for c in canaries[0] if c.kind == "email")
    else:
        c = custom_canary("7", SecretSpace("", string.digits, 1))
    lay = char_layout(byte_tokenizer, c)
    fast = enumerate_charwise(tiny_llama, lay, c.space.n_free, batch_size=64)
    frees = ["".join(x) for x in itertools.product(c.space.alphabet, repeat=c.space.n_free)]
    context, conts = ex._tokenized_candidates(byte_tokenizer, c, frees)
    generic = score_continuations(tiny_llama, context, conts, batch_size=128)
    assert fast.shape == (c.space.size,)
    torch.testing.assert_close(fast, generic, atol=1e-5, rtol=0)
    # and the slow loop (the e-mail's fixed head is part of the shared context, so it is not scored)
    torch.testing.assert_close(fast, slow_candidate_scores(tiny_llama, byte_tokenizer, c, after_head=True),
                               atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- exact exposure


def _force_generic(monkeypatch) -> None:
    monkeypatch.setattr(ex, "char_layout", lambda *_: None)


@pytest.mark.parametrize("path", ["charwise", "generic"])
def test_exact_exposure_matches_brute_force_on_tiny_llama(tiny_llama, byte_tokenizer, canaries, monkeypatch,
                                                          path) -> None:
    if path == "generic":
        _force_generic(monkeypatch)
    digits = next(c for c in canaries[0] if c.kind == "digits")
    slow = slow_candidate_scores(tiny_llama, byte_tokenizer, digits)
    idx = digits.space.index(digits.secret)
    gaps = (slow - slow[idx]).abs()
    gaps[idx] = 1.0
    assert float(gaps.min()) > 1e-4  # no near-ties, so the rank is well defined at float precision
    res = exact_exposure(tiny_llama, byte_tokenizer, digits, batch_size=16)
    assert res.method == "exact" and res.n_candidates == 100 and res.size_log2 == pytest.approx(math.log2(100))
    assert res.rank == slow_rank(slow, idx)
    assert res.exposure == pytest.approx(math.log2(100) - math.log2(res.rank))
    assert res.secret_logprob == pytest.approx(float(slow[idx]), abs=1e-5)
    assert 0 <= res.exposure <= res.size_log2 and res.sample_fraction_above is None


@pytest.mark.parametrize("path", ["charwise", "generic"])
def test_exact_exposure_matches_brute_force_on_history_dependent_oracle(byte_tokenizer, canaries, monkeypatch,
                                                                        path) -> None:
    """Logits that depend on the whole history check the cache handling (deepcopy, batch repeat)."""
    if path == "generic":
        _force_generic(monkeypatch)
    digits = next(c for c in canaries[0] if c.kind == "digits")
    model = OracleLM(noise=2.0)  # memorised nothing: pseudo-random, history-dependent logits
    slow = slow_candidate_scores(model, byte_tokenizer, digits)
    idx = digits.space.index(digits.secret)
    res = exact_exposure(model, byte_tokenizer, digits, batch_size=8)
    assert res.rank == slow_rank(slow, idx)
    assert res.secret_logprob == pytest.approx(float(slow[idx]), abs=1e-5)


@pytest.mark.parametrize("path", ["charwise", "generic"])
def test_memorised_secret_has_full_exposure(byte_tokenizer, canaries, monkeypatch, path) -> None:
    if path == "generic":
        _force_generic(monkeypatch)
    members, nonmembers = canaries
    one_char = custom_canary("4", SecretSpace("", string.digits, 1))
    model = oracle_for(byte_tokenizer, [*members, one_char])
    for c in [*members, one_char]:
        res = exact_exposure(model, byte_tokenizer, c)
        assert res.rank == 1.0 and res.n_candidates == c.space.size
        assert res.exposure == pytest.approx(math.log2(c.space.size), abs=1e-12) == c.space.size_log2
    # a non-member the oracle never saw is not exposed to the maximum
    for c in nonmembers:
        assert exact_exposure(model, byte_tokenizer, c).exposure < c.space.size_log2 - 1


@pytest.mark.parametrize("path", ["charwise", "generic"])
def test_uniform_model_gives_mid_rank(byte_tokenizer, canaries, monkeypatch, path) -> None:
    if path == "generic":
        _force_generic(monkeypatch)
    model = OracleLM(noise=0.0)
    for c in canaries[0]:
        n = c.space.size
        res = exact_exposure(model, byte_tokenizer, c)
        assert res.rank == (n + 1) / 2
        assert res.exposure == pytest.approx(math.log2(n) - math.log2((n + 1) / 2), abs=1e-12)
        assert res.secret_logprob == pytest.approx(-c.space.n_free * math.log(259), abs=1e-5)


# --------------------------------------------------------------------------------------------- skew-normal


@pytest.mark.parametrize("a", [0.0, 4.0, -3.0])
@pytest.mark.parametrize(("q", "tol"), [(0.2, 0.15), (0.05, 0.3), (0.01, 0.5)])
def test_skewnorm_exposure_recovers_the_quantile(a, q, tol) -> None:
    """A secret at quantile q of the candidates' NLL distribution has exposure -log2 q (one sample of 4000;
    the tolerance is about 3 standard deviations of the estimate at this sample size)."""
    dist = stats.skewnorm(a, loc=30.0, scale=4.0)
    samples = dist.rvs(size=4000, random_state=np.random.default_rng(0))
    got = skewnorm_exposure(float(dist.ppf(q)), samples, size_log2=40.0)
    assert got == pytest.approx(-math.log2(q), abs=tol)


def test_skewnorm_exposure_is_unbiased_in_the_tail() -> None:
    dist = stats.skewnorm(4.0, loc=30.0, scale=4.0)
    secret = float(dist.ppf(0.01))
    errs = [skewnorm_exposure(secret, dist.rvs(size=4000, random_state=np.random.default_rng(s)), 40.0)
            - math.log2(100) for s in range(10)]
    assert abs(float(np.mean(errs))) < 0.15


def test_skewnorm_exposure_is_clipped_and_monotone() -> None:
    samples = stats.norm(20.0, 2.0).rvs(size=500, random_state=np.random.default_rng(0))
    assert skewnorm_exposure(-1e6, samples, size_log2=9.5) == 9.5  # far likelier than every sample
    assert skewnorm_exposure(1e6, samples, size_log2=9.5) == 0.0  # far less likely
    vals = [skewnorm_exposure(x, samples, size_log2=9.5) for x in (10.0, 14.0, 18.0, 20.0, 24.0)]
    assert all(0.0 <= v <= 9.5 for v in vals)
    assert vals == sorted(vals, reverse=True)
    assert vals[3] == pytest.approx(1.0, abs=0.15)  # the median: -log2(1/2)


def test_skewnorm_exposure_rejects_bad_samples() -> None:
    with pytest.raises(ValueError, match="at least 8"):
        skewnorm_exposure(1.0, np.arange(7.0), 10.0)
    with pytest.raises(ValueError, match="finite"):
        skewnorm_exposure(1.0, np.r_[np.arange(10.0), np.nan], 10.0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_skewnorm_exposure_with_identical_samples() -> None:
    # every sampled candidate as likely as the secret: the secret is at the median, exposure ~ 1 bit
    assert skewnorm_exposure(5.0, np.full(64, 5.0), 10.0) == pytest.approx(1.0, abs=0.5)


# --------------------------------------------------------------------------------------------- estimated exposure


def test_estimated_exposure_of_a_memorised_secret_is_clipped_to_the_maximum(byte_tokenizer, canaries) -> None:
    members, _ = canaries
    model = oracle_for(byte_tokenizer, members)
    for c in members:
        res = estimated_exposure(model, byte_tokenizer, c, n_samples=32)
        assert res.method == "estimated" and res.n_candidates == 32 and res.rank is None
        assert res.exposure == c.space.size_log2 and res.sample_fraction_above == 0.0
        assert res.secret_logprob > -1e-3  # each memorised token has p > 1 - 258 e^-15


def test_estimated_exposure_on_tiny_llama(tiny_llama, byte_tokenizer, canaries) -> None:
    digits = next(c for c in canaries[0] if c.kind == "digits")
    exact = exact_exposure(tiny_llama, byte_tokenizer, digits)
    res = estimated_exposure(tiny_llama, byte_tokenizer, digits, n_samples=400, seed=1)
    assert res.method == "estimated" and res.n_candidates == 400
    assert 0.0 <= res.exposure <= res.size_log2 == exact.size_log2
    assert res.secret_logprob == pytest.approx(exact.secret_logprob, abs=1e-5)
    # sampled uniformly from the other 99 candidates: the share above the secret estimates (rank - 1) / 99
    assert res.sample_fraction_above == pytest.approx((exact.rank - 1) / 99, abs=0.1)
    again = estimated_exposure(tiny_llama, byte_tokenizer, digits, n_samples=400, seed=1)
    assert again == res
    other = estimated_exposure(tiny_llama, byte_tokenizer, digits, n_samples=400, seed=2)
    assert other.sample_fraction_above != res.sample_fraction_above or other.exposure != res.exposure


def test_canary_exposure_dispatches_on_the_space_size(byte_tokenizer, canaries) -> None:
    members, _ = canaries
    model = oracle_for(byte_tokenizer, members)
    digits = next(c for c in members if c.kind == "digits")
    exact = canary_exposure(model, byte_tokenizer, digits, max_enumerate=100)
    est = canary_exposure(model, byte_tokenizer, digits, max_enumerate=99, n_samples=16)
    assert exact.method == "exact" and exact.n_candidates == 100
    assert est.method == "estimated" and est.n_candidates == 16
    d = exact.to_dict()
    assert d["exposure"] == exact.exposure and set(d) == set(ExposureResult.__dataclass_fields__)


@pytest.mark.smollm2
def test_char_layout_with_smollm2_tokenizer(smollm2_dir) -> None:
    """SmolLM2 spells digits one token each: digit secrets get a layout that reproduces every candidate's
    tokenization; alphanumeric passwords (which merge) and Luhn cards do not."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    members, _ = make_canaries(n_per_kind=1, seed=2, digits_len=3)
    by_kind = {c.kind: c for c in members}
    assert char_layout(tok, by_kind["password"]) is None and char_layout(tok, by_kind["card"]) is None
    rng = np.random.default_rng(0)
    for kind in ("digits", "email", "id", "phone"):
        c = by_kind[kind]
        lay = char_layout(tok, c)
        assert lay is not None and lay.context[0] == tok.eos_token_id, kind
        for _ in range(20):
            free = "".join(rng.choice(list(c.space.alphabet), c.space.n_free))
            full = tok(c.prefix + c.space.compose(free), add_special_tokens=False)["input_ids"]
            assert [tok.eos_token_id, *full] == lay.context + lay.head + [lay.char_tokens[int(ch)] for ch in free]
