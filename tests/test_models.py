"""Model loading, tiny models, the byte tokenizer and layer discovery."""

import json

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from libortho.models import (
    ByteTokenizer,
    UnsupportedModelError,
    block_linears,
    block_prefix,
    build_tiny_llama,
    decoder_blocks,
    find_linears,
    load_model,
)

LLAMA_ORDER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def test_decoder_blocks_and_block_linears_on_tiny_llama(tiny_llama) -> None:
    blocks = decoder_blocks(tiny_llama)
    assert len(blocks) == 2 and block_prefix(tiny_llama) == "model.layers"
    lin = block_linears(blocks[0])
    assert list(lin) == LLAMA_ORDER
    assert all(isinstance(m, nn.Linear) for m in lin.values())
    assert tuple(lin["self_attn.q_proj"].weight.shape) == (64, 64)
    assert tuple(lin["self_attn.k_proj"].weight.shape) == (32, 64)  # 2 KV heads of 16
    assert tuple(lin["mlp.down_proj"].weight.shape) == (64, 160)


def test_find_linears_qualified_names_and_skip(tiny_llama) -> None:
    every = find_linears(tiny_llama, skip=())
    assert "lm_head" in every and len(every) == 2 * 7 + 1
    lin = find_linears(tiny_llama)
    assert "lm_head" not in lin and len(lin) == 14
    assert list(lin)[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert lin["model.layers.1.mlp.up_proj"] is tiny_llama.model.layers[1].mlp.up_proj
    assert len(find_linears(tiny_llama, skip=("lm_head", "k_proj"))) == 12


def test_build_tiny_llama_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_tiny_llama(seed=3), build_tiny_llama(seed=3)
    assert torch.equal(torch.rand(1), before)
    assert isinstance(a, LlamaForCausalLM) and not a.training
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    c = build_tiny_llama(seed=4)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    small = build_tiny_llama(vocab_size=256, intermediate_size=128)
    assert small.config.vocab_size == 256 and small.config.pad_token_id is None


def test_conv1d_models_are_refused_with_a_clear_message() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    assert len(decoder_blocks(gpt2)) == 1
    with pytest.raises(UnsupportedModelError, match=r"attn\.c_attn.*Conv1D.*nn\.Linear"):
        block_linears(decoder_blocks(gpt2)[0])
    with pytest.raises(UnsupportedModelError, match=r"transformer\.h\.0\.attn\.c_attn"):
        find_linears(gpt2)


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="decoder blocks"):
        decoder_blocks(nn.Sequential(nn.Linear(2, 2)))
    assert issubclass(UnsupportedModelError, ValueError)


def test_byte_tokenizer_roundtrip_and_batch(tmp_path) -> None:
    tok = ByteTokenizer()
    text = "héllo, wörld"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a", add_special_tokens=True)[0] == tok.bos_token_id
    enc = tok(["ab", "abcd"], return_tensors="pt")
    assert enc["input_ids"].shape == (2, 4) and enc["input_ids"].dtype == torch.long
    assert enc["input_ids"][0, :2].tolist() == [tok.pad_token_id] * 2  # left padding
    assert enc["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert tok.decode([104, tok.eos_token_id, 105], skip_special_tokens=False) == "h</s>i"
    tok.save_pretrained(tmp_path)
    assert isinstance(ByteTokenizer.from_pretrained(tmp_path), ByteTokenizer)
    (tmp_path / ByteTokenizer.FILE).write_text(json.dumps({"type": "bpe"}))
    with pytest.raises(ValueError, match="byte tokenizer"):
        ByteTokenizer.from_pretrained(tmp_path)


def test_load_model_tiny_generates() -> None:
    model, tok = load_model("tiny")
    assert not model.training and isinstance(tok, ByteTokenizer)
    enc = tok("To be", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, enc["input_ids"].shape[1] + 6)
    assert isinstance(tok.decode(out[0]), str)


def test_load_model_from_a_saved_directory(tmp_path, tiny_llama) -> None:
    tiny_llama.save_pretrained(tmp_path)
    ByteTokenizer().save_pretrained(tmp_path)
    model, tok = load_model(tmp_path)
    assert isinstance(tok, ByteTokenizer) and not model.training
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_llama(ids).logits)
    (tmp_path / ByteTokenizer.FILE).unlink()
    assert load_model(tmp_path)[1] is None  # no tokenizer files: None, with a warning


def test_load_model_errors_name_the_problem(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"\0")
    with pytest.raises(ValueError, match="gguf"):
        load_model(txt)
    enc_dir = tmp_path / "bert"
    enc_dir.mkdir()
    (enc_dir / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match="causal language model"):
        load_model(enc_dir)


@pytest.mark.smollm2
def test_smollm2_loads_as_plain_fp32(smollm2_dir) -> None:
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    model, tok = load_model("smollm2-135m")
    assert getattr(model.config, "quantization_config", None) is None
    blocks = decoder_blocks(model)
    assert len(blocks) == 30
    shapes = {n: tuple(m.weight.shape) for n, m in block_linears(blocks[0]).items()}
    assert list(shapes) == LLAMA_ORDER
    assert shapes == {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
                      "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576),
                      "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536)}
    assert model.model.embed_tokens.weight.dtype == torch.float32
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


def test_require_tokenizer_refuses_before_reading_weights(tmp_path, tiny_llama, monkeypatch) -> None:
    import libortho.models.load as ml

    tiny_llama.save_pretrained(tmp_path)
    monkeypatch.setattr(ml, "_load_causal_lm", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(FileNotFoundError, match="has no tokenizer files"):
        load_model(tmp_path, require_tokenizer=True)
    monkeypatch.undo()
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")  # present but unreadable
    with pytest.raises(ValueError, match="could not be loaded"):
        load_model(tmp_path, require_tokenizer=True)


def test_decompositions_load_their_tokenizer_with_the_model_loader(tmp_path) -> None:
    """One tokenizer loader: checkpoint.load returns what models.load.load_tokenizer gives for the directory."""
    import libortho.checkpoint as ck
    from libortho.models import load_tokenizer

    assert ck.load_tokenizer is load_tokenizer and not hasattr(ck, "_load_tokenizer")
    ByteTokenizer().save_pretrained(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert load_tokenizer(tmp_path / "empty-dir-does-not-exist") is None
