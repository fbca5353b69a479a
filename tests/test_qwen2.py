"""A non-Llama architecture end to end: a tiny random Qwen2 (biases on q/k/v, tied embeddings) is
decomposed, saved, loaded and generated from, through the library and through the CLI."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

import libortho
from libortho.cli import app
from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
from libortho.models import ByteTokenizer
from libortho.runtime import OrthoLinear

QKV = ("q_proj", "k_proj", "v_proj")
TEXT = "Now is the winter of our discontent made glorious summer by this sun of York. " * 30


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """vocab 259 (the byte tokenizer), hidden 64, 2 layers, 4 query / 2 KV heads; every bias random, non-zero."""
    tok = ByteTokenizer()
    cfg = Qwen2Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg).eval()
        for layer in model.model.layers:
            for name in QKV:
                torch.nn.init.normal_(getattr(layer.self_attn, name).bias, std=0.5)
    return model


def _calibration() -> torch.Tensor:
    ids = torch.tensor(list(TEXT.encode()))
    return ids[: 4 * 64].view(4, 64)


def _logits(model: torch.nn.Module, alpha: float) -> torch.Tensor:
    libortho.set_alpha(model, alpha)
    ids = torch.tensor([list(b"Now is the winter")])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_qwen2_has_qkv_biases_and_no_o_bias() -> None:
    attn = tiny_qwen2().model.layers[0].self_attn
    assert all(getattr(attn, n).bias is not None for n in QKV) and attn.o_proj.bias is None


def test_qwen2_decompose_save_load_keeps_biases_and_logits(tmp_path) -> None:
    model = tiny_qwen2()
    biases = {f"model.layers.{i}.self_attn.{n}": getattr(layer.self_attn, n).bias.detach().clone()
              for i, layer in enumerate(model.model.layers) for n in QKV}
    cfg = DecomposeConfig(quant=QuantConfig(bits=4, group_size=32), select=SelectConfig(rho=0.02, selector="obs"))
    libortho.decompose(model, _calibration(), cfg, progress=False)
    assert len(libortho.runtime.ortho_layers(model)) == 2 * 7
    before = {a: _logits(model, a) for a in (0.0, 1.0)}
    assert not torch.equal(before[0.0], before[1.0])  # the ortho stream changes the output
    out = libortho.save(model, tmp_path / "dec", config=cfg.to_dict(), tokenizer=ByteTokenizer())
    loaded, tok = libortho.load(out, alpha=1.0)
    assert isinstance(loaded, Qwen2ForCausalLM) and isinstance(tok, ByteTokenizer)
    for name, bias in biases.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, OrthoLinear) and torch.equal(layer.bias, bias)
    assert loaded.get_submodule("model.layers.0.self_attn.o_proj").bias is None
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    for a in (0.0, 1.0):
        assert torch.equal(_logits(loaded, a), before[a]), f"logits differ after save/load at alpha {a}"


def test_qwen2_through_the_cli(tmp_path) -> None:
    """decompose a Qwen2 directory, then generate at alpha 0 and 1: the CLI prints what the library generates."""
    from libortho.workflows import greedy

    src = tmp_path / "qwen2"
    tiny_qwen2().save_pretrained(src)
    ByteTokenizer().save_pretrained(src)
    (tmp_path / "corpus.txt").write_text(TEXT)
    runner = CliRunner()
    res = runner.invoke(app, ["decompose", str(src), str(tmp_path / "dec"), "--group-size", "32", "--n-calib", "4",
                              "--seq-len", "64", "--rho", "0.02", "--calib", str(tmp_path / "corpus.txt")])
    assert res.exit_code == 0, res.output
    info = runner.invoke(app, ["info", str(tmp_path / "dec")])
    assert info.exit_code == 0 and "model.layers.1.self_attn.q_proj" in info.output
    model, tok = libortho.load(tmp_path / "dec", alpha=1.0)
    for alpha in (0.0, 1.0):
        gen = runner.invoke(app, ["generate", str(tmp_path / "dec"), "Now is", "--alpha", str(alpha),
                                  "--max-new-tokens", "12"])
        assert gen.exit_code == 0, gen.output
        libortho.set_alpha(model, alpha)
        assert gen.stdout.rstrip("\n") == greedy(model, tok, "Now is", 12)

