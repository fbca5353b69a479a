"""Assembling dual-stream models from separation results: the null test and the FP round trip, per method."""

from __future__ import annotations

import copy

import pytest
import torch

from libortho.assemble import (
    dequantized,
    dual_stream,
    full_precision_with_memory,
    load_streams,
    quantized,
    save_streams,
)
from libortho.config import QuantConfig
from libortho.data.private import PrivateRecord, pack_private_records
from libortho.data.records import TokenRows
from libortho.models import ByteTokenizer, build_tiny_llama
from libortho.runtime import set_alpha
from libortho.train.loop import TrainConfig
from libortho.train.separation import SeparationConfig, separate

ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
QUANT = QuantConfig(bits=4, group_size=32, method="rtn")


def _rows() -> TokenRows:
    tok = ByteTokenizer()
    recs = [PrivateRecord(f"Note {i}: the code is {1000 + 37 * i}. Thanks.", str(1000 + 37 * i)) for i in range(4)]
    priv = pack_private_records(tok, recs, 64, [2] * 4)
    pub = TokenRows.from_blocks(torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1)),
                                first_seq=1 << 62)
    return TokenRows.cat([pub, priv])


@pytest.fixture(scope="module", params=["mask", "ogd", "route", "memsink", "two-phase"])
def separated(request):
    rows = _rows()
    model = build_tiny_llama(seed=0, **ARCH)
    cfg = SeparationConfig(method=request.param, train=TrainConfig(lr=1e-2, steps=3, batch_size=4, warmup=0.0),
                           neurons=8, rank=4, support_neurons=8, probe_rows=4, memory_dtype="fp32")
    captured = {}
    from libortho.train import separation as sep

    original = sep.Separation.finish

    def finish(self, m, logs, t0, rule):  # logits of the live train-time model, memory on, before export
        m.eval()
        with torch.no_grad():
            captured["fp_a1"] = m(input_ids=rows.input_ids[:2]).logits.clone()
        return original(self, m, logs, t0, rule)

    sep.Separation.finish = finish
    try:
        res = separate(model, rows, cfg, progress=False)
    finally:
        sep.Separation.finish = original
    return request.param, res, rows, captured["fp_a1"]


def test_alpha0_is_bit_identical_to_the_quantized_shared_model(separated) -> None:
    _method, res, rows, _ = separated
    dual, _ = dual_stream(res.model, res.streams, None, QUANT, alpha=0.0)
    plain, _ = quantized(res.model, None, QUANT)
    with torch.no_grad():
        assert torch.equal(dual(input_ids=rows.input_ids[:2]).logits, plain(input_ids=rows.input_ids[:2]).logits)
        set_alpha(dual, 1.0)
        assert not torch.equal(dual(input_ids=rows.input_ids[:2]).logits, plain(input_ids=rows.input_ids[:2]).logits)


def test_full_precision_memory_reattached_reproduces_the_trained_model(separated, tmp_path) -> None:
    _method, res, rows, live = separated
    streams = load_streams(save_streams(tmp_path / "mem", res.streams))  # through the files as well
    model, ctx = full_precision_with_memory(res.model, streams)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=rows.input_ids[:2]).logits, live, rtol=1e-5, atol=1e-5)
        ctx.memory_on = False
        off = model(input_ids=rows.input_ids[:2]).logits
        assert torch.equal(off, res.model(input_ids=rows.input_ids[:2]).logits)


def test_dequantized_copy_is_the_alpha0_model_as_plain_weights(separated) -> None:
    _method, res, rows, _ = separated
    dual, _ = dual_stream(res.model, res.streams, None, QUANT, alpha=1.0)
    plain = dequantized(dual)
    ref, _ = quantized(res.model, None, QUANT)
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in plain.parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(input_ids=rows.input_ids[:2]).logits,
                                   ref(input_ids=rows.input_ids[:2]).logits, rtol=2e-2, atol=2e-2)
    assert not any(hasattr(m, "memory") for m in plain.modules() if m is not plain)
    copy.deepcopy(plain)
