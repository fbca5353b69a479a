"""Behaviour measures (markers, phrase log-probability, KL) and the left-padded batches they run on,
each checked against a slow reference written here: one prompt at a time, no padding, no library helper."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from libortho.data.prompts import left_pad, prompt_batches
from libortho.edit.directions import residual_means
from libortho.eval.behaviour import (
    continuation_kl,
    first_token_logprobs,
    kl_rows,
    logits_fn,
    marker_hits,
    phrase_logprob,
)

# Lengths 2 .. 60 bytes, so one batch holds rows with very different amounts of left padding.
PROMPTS = ["Hi", "Tell me about owls and where they live in the winter, please.", "What do foxes eat?",
           "A", "Write a haiku about the sea and the moon."]
PHRASE = "I'm sorry, but no."


def _ids(tok, text: str) -> list[int]:
    """The byte tokenizer's prompt ids, spelled out: BOS then the UTF-8 bytes (no chat template)."""
    return [tok.bos_token_id, *text.encode("utf-8")]


def _logp_unbatched(model, ids: list[int]) -> torch.Tensor:
    """(T, V) next-token log-probabilities of one unpadded row."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
    return torch.log_softmax(logits, -1)


# --- markers --------------------------------------------------------------------------------------------------


def test_marker_hits_is_case_insensitive_and_folds_curly_apostrophes() -> None:
    texts = ["I'M SORRY, I can't.", "i\u2019m sorry", "Sure, here it is.", "As An AI model", "I cannot help",
             "sorry", ""]
    assert marker_hits(texts) == [True, True, False, True, True, False, False]
    # a curly apostrophe in the marker matches a straight one in the text, and vice versa
    assert marker_hits(["I won't do that", "I won\u2019t"], ["i won\u2019t"]) == [True, True]
    assert marker_hits(["nope", "Absolutely NOT"], ["not"]) == [False, True]
    with pytest.raises(ValueError):
        marker_hits(["x"], [])


# --- KL --------------------------------------------------------------------------------------------------------


def test_kl_rows_matches_a_hand_computed_value() -> None:
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([0.25, 0.75])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    got = kl_rows(p.log(), q.log())
    assert got.shape == ()
    assert float(got) == pytest.approx(want, abs=1e-7)
    # direction matters: KL(q || p) is a different number
    back = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(kl_rows(q.log(), p.log())) == pytest.approx(back, abs=1e-7)
    assert abs(want - back) > 1e-3


def test_kl_rows_is_zero_for_equal_rows_and_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.log_softmax(torch.randn(3, 4, 50, generator=g), -1)
    b = torch.log_softmax(torch.randn(3, 4, 50, generator=g), -1)
    same = kl_rows(a, a.clone())
    assert same.shape == (3, 4) and torch.equal(same, torch.zeros(3, 4, dtype=same.dtype))
    diff = kl_rows(a, b)
    assert diff.shape == (3, 4) and bool((diff > 0).all())
    # row by row it is sum_v p (log p - log q), written out
    ref = torch.tensor([[sum(float(a[i, j, v].exp()) * float(a[i, j, v] - b[i, j, v]) for v in range(50))
                         for j in range(4)] for i in range(3)], dtype=torch.float64)
    assert torch.allclose(diff, ref, atol=1e-6)


# --- left padding ----------------------------------------------------------------------------------------------


def test_left_pad_right_aligns_rows_and_counts_positions_from_the_first_real_token() -> None:
    ids, mask, pos = left_pad([[5, 6, 7], [8], [9, 10]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    real = [[int(p) for p, m in zip(prow, mrow, strict=True) if m] for prow, mrow in zip(pos, mask, strict=True)]
    assert real == [[0, 1, 2], [0], [0, 1]]
    assert int(pos.min()) >= 0


def test_prompt_batches_cover_every_row_once_with_its_own_tokens() -> None:
    rows = [[1] * n for n in (3, 7, 1, 5, 2)]
    rows = [[i * 10 + k for k in range(len(r))] for i, r in enumerate(rows)]
    seen = []
    for b in prompt_batches(rows, pad=99, batch_size=2):
        for j, i in enumerate(b.index):
            n = len(rows[i])
            assert b.input_ids[j, -n:].tolist() == rows[i]
            assert b.attention_mask[j].sum() == n
            assert b.position_ids[j, -n:].tolist() == list(range(n))
        seen += b.index
    assert sorted(seen) == list(range(len(rows)))


# --- model-based measures against unbatched references ----------------------------------------------------------


def test_phrase_logprob_equals_an_unpadded_per_prompt_reference(tiny_llama, byte_tokenizer) -> None:
    model, tok = tiny_llama, byte_tokenizer
    target = list(PHRASE.encode("utf-8"))
    want = []
    for p in PROMPTS:
        ids = _ids(tok, p)
        logp = _logp_unbatched(model, ids + target)
        want.append(float(torch.stack([logp[len(ids) - 1 + j, t] for j, t in enumerate(target)]).mean()))
    got = phrase_logprob(logits_fn(model), tok, PROMPTS, PHRASE, batch_size=8)  # one padded batch
    assert got == pytest.approx(want, abs=1e-4)
    got_small = phrase_logprob(logits_fn(model), tok, PROMPTS, PHRASE, batch_size=2)
    assert got_small == pytest.approx(want, abs=1e-4)
    assert max(want) - min(want) > 1e-3  # the prompts are told apart: a misordered result would fail


def test_first_token_logprobs_equal_an_unpadded_per_prompt_reference(tiny_llama, byte_tokenizer) -> None:
    model, tok = tiny_llama, byte_tokenizer
    want = torch.stack([_logp_unbatched(model, _ids(tok, p))[-1] for p in PROMPTS]).float()
    got = first_token_logprobs(logits_fn(model), tok, PROMPTS, batch_size=8)
    assert got.shape == (len(PROMPTS), tok.vocab_size)
    assert torch.allclose(got, want, atol=1e-4)


def _perturbed(model):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return other


def test_continuation_kl_is_zero_against_itself_and_positive_against_a_perturbed_copy(tiny_llama,
                                                                                     byte_tokenizer) -> None:
    model, tok = tiny_llama, byte_tokenizer
    conts = [[65, 66, 67], [10], [], [70, 71, 72, 73, 74], [33, 34]]  # different lengths, one empty
    fn = logits_fn(model)
    first, cont = continuation_kl(fn, fn, tok, PROMPTS, conts, batch_size=8)
    assert first == [0.0] * len(PROMPTS) and cont == [0.0] * len(PROMPTS)

    other = _perturbed(model)
    first, cont = continuation_kl(fn, logits_fn(other), tok, PROMPTS, conts, batch_size=8)
    assert all(x > 0 for x in first) and all(x > 0 for x in cont)

    # unpadded reference: KL at the positions that predict each continuation token
    for i, (p, c) in enumerate(zip(PROMPTS, conts, strict=True)):
        ids = _ids(tok, p)
        a, b = _logp_unbatched(model, ids + c), _logp_unbatched(other, ids + c)
        kl = (a.exp() * (a - b)).sum(-1)
        start = len(ids) - 1
        assert first[i] == pytest.approx(float(kl[start]), rel=1e-3, abs=1e-6)
        assert cont[i] == pytest.approx(float(kl[start:start + max(1, len(c))].mean()), rel=1e-3, abs=1e-6)


def _last_position_into(store: dict[int, torch.Tensor], i: int):
    def hook(_m, _a, out) -> None:
        store[i] = (out[0] if isinstance(out, tuple) else out)[0, -1].double()
    return hook


def test_residual_means_equal_an_unbatched_reference(tiny_llama, byte_tokenizer) -> None:
    model, tok = tiny_llama, byte_tokenizer
    layers = model.model.layers
    per_prompt = []
    for p in PROMPTS:
        got: dict[int, torch.Tensor] = {}
        hooks = [layer.register_forward_hook(_last_position_into(got, i)) for i, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                hs = model(input_ids=torch.tensor([_ids(tok, p)]), output_hidden_states=True,
                           use_cache=False).hidden_states
        finally:
            for h in hooks:
                h.remove()
        # hidden_states[l + 1] is layer l's output (the last entry has the final norm applied)
        for i in range(len(layers) - 1):
            assert torch.allclose(got[i], hs[i + 1][0, -1].double(), atol=1e-6)
        per_prompt.append(torch.stack([got[i] for i in range(len(layers))]))
    want = torch.stack(per_prompt).mean(0)
    for bs in (8, 2):
        mu = residual_means(model, tok, PROMPTS, "last", batch_size=bs)
        assert mu.shape == (len(layers), model.config.hidden_size)
        assert torch.allclose(mu.double(), want, atol=1e-5, rtol=1e-5), float((mu.double() - want).abs().max())
    # one prompt alone is that prompt's own last-position residual
    one = residual_means(model, tok, PROMPTS[1:2], "last")
    assert torch.allclose(one.double(), per_prompt[1], atol=1e-5)
