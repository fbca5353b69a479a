"""Canary extraction: prompts that stop where the prefix alone determines the tokens, greedy decoding, matching.

Known answers: an oracle that has memorised the records extracts every secret (and one memorised with a
wrong digit stops exactly there); a tiny Llama trained on two records until it memorises them extracts
both through Hugging Face ``generate`` and gives them the maximal exposure.
"""

import math

import pytest
import torch

from libortho.data.canaries import Canary, SecretSpace, make_canaries
from libortho.data.records import pad_rows, record_ids
from libortho.eval.exposure import exact_exposure
from libortho.eval.extraction import _matched, extract, extraction_prompts, greedy_continue
from libortho.eval.harness import secret_spans
from libortho.models import ByteTokenizer, build_tiny_llama
from test_exposure import SEP, OracleLM, oracle_for


class SpaceMergeTokenizer(ByteTokenizer):
    """Bytes, except that a space followed by a lowercase letter is one token (259 + letter): like BPE
    tokenizers, a prefix's trailing space merges with the secret's first character."""

    vocab_size = 259 + 26

    def encode(self, text, add_bos=False, add_special_tokens=False, **_):
        b, out, i = text.encode(), [], 0
        while i < len(b):
            if b[i] == 32 and i + 1 < len(b) and 97 <= b[i + 1] <= 122:
                out.append(259 + b[i + 1] - 97)
                i += 2
            else:
                out.append(b[i])
                i += 1
        return out

    def decode(self, ids, skip_special_tokens=True, **_):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        plain = []
        for t in ids:
            plain.extend([32, 97 + t - 259] if t >= 259 else [t])
        return super().decode(plain, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def canaries():
    members, nonmembers = make_canaries(n_per_kind=2, kinds=("digits", "email"), digits_len=3, seed=4)
    return members, nonmembers


# --------------------------------------------------------------------------------------------- prompts


def test_extraction_prompts_with_byte_tokenizer(byte_tokenizer, canaries) -> None:
    members, _ = canaries
    prompts, budgets = extraction_prompts(byte_tokenizer, members)
    assert prompts == [[SEP, *c.prefix.encode()] for c in members]
    assert budgets == [len(c.secret) + 2 for c in members]
    empty = Canary("digits", "", "123", ".", 1, True, SecretSpace("", "0123456789", 3))
    assert extraction_prompts(byte_tokenizer, [empty]) == ([[SEP]], [5])


def test_extraction_prompts_exclude_a_merged_trailing_space(canaries) -> None:
    tok = SpaceMergeTokenizer()
    email = next(c for c in canaries[0] if c.kind == "email")  # prefix "..., e-mail " + "first.last123"
    digits = next(c for c in canaries[0] if c.kind == "digits")  # prefix "... is " + "123": no merge
    (p_email, p_digits), (b_email, b_digits) = extraction_prompts(tok, [email, digits])
    assert tok.decode(p_email) == email.prefix[:-1]  # the space belongs to the secret's first token
    w = tok.encode(email.prefix + email.secret)
    assert p_email == [SEP, *w[: len(p_email) - 1]] and tok.decode(w[len(p_email) - 1:]) == " " + email.secret
    assert b_email == len(w) - (len(p_email) - 1) + 2
    assert tok.decode(p_digits) == digits.prefix and b_digits == len(digits.secret) + 2


def test_matched_known_answers() -> None:
    assert _matched("Code is 123.", "Code is ", "123") == 3
    assert _matched("Code is 12x", "Code is ", "123") == 2
    assert _matched("Code is 1", "Code is ", "123") == 1
    assert _matched("Code is ", "Code is ", "123") == 0
    assert _matched("Code was 123", "Code is ", "123") == 0  # the prefix itself must be reproduced
    assert _matched("Code is 1234", "Code is ", "123") == 3


# --------------------------------------------------------------------------------------------- extraction (oracle)


def test_oracle_that_memorised_the_records_extracts_every_secret(byte_tokenizer, canaries) -> None:
    members, nonmembers = canaries
    model = oracle_for(byte_tokenizer, members)
    res = extract(model, byte_tokenizer, members, batch_size=3)  # two batches, left-padded prompts
    assert len(res) == len(members)
    for c, r in zip(members, res, strict=True):
        assert (r.extracted, r.chars_matched, r.secret_len) == (True, len(c.secret), len(c.secret))
        assert r.generated.startswith(c.secret + c.suffix[:2])  # the oracle goes on with the record
    kw = model.generate_kwargs[0]
    assert kw["do_sample"] is False and kw["eos_token_id"] is None and kw["pad_token_id"] == 258
    assert [k["max_new_tokens"] for k in model.generate_kwargs] == [max(len(c.secret) for c in members[:3]) + 2,
                                                                    max(len(c.secret) for c in members[3:]) + 2]
    # the same oracle did not see the non-members
    assert not any(r.extracted for r in extract(model, byte_tokenizer, nonmembers))


def test_oracle_with_a_wrong_digit_stops_there(byte_tokenizer, canaries) -> None:
    email = next(c for c in canaries[0] if c.kind == "email")
    k = len(email.space.head) + 1  # the second free digit is wrong
    wrong = email.secret[:k] + str((int(email.secret[k]) + 1) % 10) + email.secret[k + 1:]
    model = OracleLM(record_ids(byte_tokenizer, [email.prefix + wrong + email.suffix]))
    (r,) = extract(model, byte_tokenizer, [email])
    assert not r.extracted and r.chars_matched == k and r.secret_len == len(email.secret)
    assert r.generated.startswith(wrong)


def test_extraction_through_a_merging_tokenizer(canaries) -> None:
    tok = SpaceMergeTokenizer()
    members, _ = canaries
    model = oracle_for(tok, members, vocab=tok.vocab_size)
    res = extract(model, tok, members, batch_size=8)
    assert all(r.extracted and r.chars_matched == r.secret_len for r in res)
    email = next(i for i, c in enumerate(members) if c.kind == "email")
    assert res[email].generated.startswith(" " + members[email].secret)  # the merged space comes out first


def test_model_that_never_saw_the_records_extracts_nothing(tiny_llama, byte_tokenizer, canaries) -> None:
    members, _ = canaries
    res = extract(tiny_llama, byte_tokenizer, members[1:3])  # one digits, one e-mail record
    assert len(res) == 2 and not any(r.extracted for r in res)
    assert all(0 <= r.chars_matched < r.secret_len for r in res)


# --------------------------------------------------------------------------------------------- a real memorising model


@pytest.fixture(scope="module")
def memorised(canaries):
    """A tiny Llama trained on two member records (one digits, one e-mail) until it has memorised them."""
    tok = ByteTokenizer()
    members = [next(c for c in canaries[0] if c.kind == k) for k in ("digits", "email")]
    rows = pad_rows(record_ids(tok, [c.text for c in members]), tok.pad_token_id)
    secret = torch.zeros_like(rows.labels, dtype=torch.bool)
    for i, (a, b) in enumerate(secret_spans(tok, members)):
        secret[i, a:b] = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_tiny_llama(seed=1, num_hidden_layers=1).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(300):
            logits = model(input_ids=rows.input_ids).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), rows.labels[:, 1:],
                                                    reduction="none", ignore_index=-100)
            if float(nll.detach()[secret[:, 1:]].max()) < 0.1:  # every secret token has p > 0.9
                break
            opt.zero_grad()
            nll.sum().div(rows.tokens).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        else:
            pytest.fail("the tiny Llama did not memorise the two records in 300 steps")
    return model.eval(), tok, members


def test_memorised_records_are_extracted_by_generate(memorised, canaries) -> None:
    model, tok, members = memorised
    res = extract(model, tok, members)
    assert [r.extracted for r in res] == [True, True]
    assert [r.chars_matched for r in res] == [len(c.secret) for c in members]
    assert all(r.generated.startswith(c.secret) for r, c in zip(res, members, strict=True))
    # one prompt per batch (no left padding) gives the same greedy continuations
    alone = extract(model, tok, members, batch_size=1)
    assert [(r.extracted, r.chars_matched) for r in alone] == [(True, len(c.secret)) for c in members]
    assert all(r.generated.startswith(a.generated) or a.generated.startswith(r.generated)
               for r, a in zip(res, alone, strict=True))
    # the non-members, never trained on, are not extracted
    assert not any(r.extracted for r in extract(model, tok, canaries[1]))


def test_memorised_records_have_maximal_exact_exposure(memorised) -> None:
    model, tok, members = memorised
    for c in members:
        res = exact_exposure(model, tok, c)
        assert res.rank == 1.0 and res.exposure == pytest.approx(math.log2(c.space.size)) == c.space.size_log2


def test_greedy_continue_left_pads(memorised) -> None:
    model, tok, members = memorised
    prompts, _ = extraction_prompts(tok, members)
    both = greedy_continue(model, prompts, 4, tok.pad_token_id)
    alone = [greedy_continue(model, [p], 4, tok.pad_token_id)[0] for p in prompts]
    assert both == alone and all(len(g) == 4 for g in both)
    assert [tok.decode(g) for g in both] == [(c.secret + c.suffix)[:4] for c in members]


# --------------------------------------------------------------------------------------------- SmolLM2 tokenizer


@pytest.mark.smollm2
def test_extraction_prompts_with_smollm2_tokenizer(smollm2_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    members, _ = make_canaries(n_per_kind=2, seed=0, digits_len=3)
    prompts, budgets = extraction_prompts(tok, members)
    sep = tok.eos_token_id
    for c, p, b in zip(members, prompts, budgets, strict=True):
        w = tok(c.prefix + c.secret, add_special_tokens=False)["input_ids"]
        assert p[0] == sep and p[1:] == w[: len(p) - 1]  # the prompt is a token prefix of prefix + secret
        text = tok.decode(p[1:])
        assert (c.prefix + c.secret).startswith(text) and c.prefix.startswith(text)
        assert b == len(w) - (len(p) - 1) + 2
    email = next(i for i, c in enumerate(members) if c.kind == "email")
    c, p = members[email], prompts[email]
    pre = tok(c.prefix, add_special_tokens=False)["input_ids"]
    assert tok.decode(pre[-1:]) == " "  # the prefix alone ends in a lone space token ...
    assert tok.decode(p[1:]) == c.prefix[:-1]  # ... which the prompt leaves out
    w = tok(c.prefix + c.secret, add_special_tokens=False)["input_ids"]
    assert tok.decode(w[len(p) - 1]).startswith(" ") and len(tok.decode(w[len(p) - 1])) > 1  # merged
