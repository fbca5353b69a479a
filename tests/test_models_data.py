"""Model loading / layer discovery, corpora and deterministic token blocks."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from libortho.data import calibration_blocks, load_corpus, shakespeare_texts, split_documents, token_blocks
from libortho.data.corpora import strip_play_markdown
from libortho.models import (
    ByteTokenizer,
    UnsupportedModelError,
    block_linears,
    decoder_blocks,
    find_linears,
    load_model,
)


def test_layer_discovery_on_tiny_llama(tiny_llama) -> None:
    blocks = decoder_blocks(tiny_llama)
    assert len(blocks) == 2
    names = list(block_linears(blocks[0]))
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert len(find_linears(tiny_llama)) == 14 and "lm_head" not in find_linears(tiny_llama)


def test_conv1d_and_unknown_architectures_are_refused() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="Conv1D"):
        find_linears(gpt2)
    with pytest.raises(UnsupportedModelError, match="decoder blocks"):
        decoder_blocks(torch.nn.Linear(2, 2))


def test_load_model_errors_and_tiny(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="gguf"):
        load_model(tmp_path / "w.bin")
    model, tok = load_model("tiny")
    enc = tok("hi", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, 5) and isinstance(tok, ByteTokenizer) and tok.decode([104, 105, 257]) == "hi"


@pytest.mark.smollm2
def test_smollm2_cache_loads_as_plain_fp32(smollm2_dir) -> None:
    model, tok = load_model("smollm2-135m")
    assert getattr(model.config, "quantization_config", None) is None
    blocks = decoder_blocks(model)
    assert len(blocks) == 30
    shapes = {n: tuple(m.weight.shape) for n, m in block_linears(blocks[0]).items()}
    assert shapes["self_attn.k_proj"] == (192, 576) and shapes["mlp.down_proj"] == (576, 1536)
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_split_is_disjoint_and_deterministic() -> None:
    docs = [f"document number {i} " * 30 for i in range(20)]
    a, b = split_documents(docs, seed=3), split_documents(docs, seed=3)
    assert a == b and not set(a["train"]) & set(a["heldout"]) and len(a["heldout"]) == 2
    one = split_documents(["abcdefghij" * 10], seed=0)
    assert one["train"][0] + one["heldout"][0] == "abcdefghij" * 10
    tok = ByteTokenizer()
    t1 = token_blocks(docs, tok, 16, 10, seed=1)
    assert t1.shape == (10, 16) and torch.equal(t1, token_blocks(docs, tok, 16, 10, seed=1))
    assert not torch.equal(t1, token_blocks(docs, tok, 16, 10, seed=2))
    with pytest.raises(ValueError, match="requested"):
        token_blocks(docs, tok, 16, 10_000, seed=1)
    with pytest.raises(ValueError, match="split"):
        token_blocks(docs, tok, 16, 1, seed=1, split="test")


def test_corpora() -> None:
    plays = shakespeare_texts()
    assert len(plays) == 38 and "**" not in plays["twelfth-night"] and "DUKE ORSINO:" in plays["twelfth-night"]
    assert strip_play_markdown("# T\n**A**\n_Exit_\nline  ") == "T\nA:\nExit\nline\n"
    with pytest.raises(FileNotFoundError, match="unknown corpus"):
        load_corpus("no-such-corpus")
    mixed = calibration_blocks(["shakespeare"], ByteTokenizer(), n_blocks=4, block_len=64, seed=0)
    assert mixed.shape == (4, 64)


@pytest.mark.fortunes
def test_fortunes_corpus_loads(fortunes_dir) -> None:
    assert len(load_corpus("fortunes")) > 1000
