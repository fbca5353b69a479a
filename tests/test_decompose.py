"""End-to-end: decompose a tiny Llama, switch alpha, save, load, generate; and bad input."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import libortho
from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
from libortho.pipeline import select_ortho
from libortho.runtime import OrthoLinear, ortho_layers, set_alpha

CFG = DecomposeConfig(quant=QuantConfig(bits=4, group_size=32), select=SelectConfig(rho=0.05, dtype="fp32"),
                      batch_size=4)


def _calib(vocab: int, n: int = 8, L: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def test_decompose_replaces_block_linears_and_alpha_switches(tiny_llama) -> None:
    fp = tiny_llama
    vocab = fp.config.vocab_size
    model = copy.deepcopy(fp)
    weights = {n: m.weight.detach().clone() for n, m in fp.named_modules()
               if isinstance(m, torch.nn.Linear) and "layers" in n}
    res = libortho.decompose(model, _calib(vocab), CFG, progress=False)
    layers = ortho_layers(model)
    assert set(layers) == set(weights) and len(res.base) == len(weights)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, OrthoLinear)
    for name, layer in layers.items():
        W = weights[name]
        eff = layer.effective_weight(1.0)
        mask = layer.ortho_stream.to_dense() != 0
        assert 0.04 < layer.ortho_stream.density <= 0.06
        # alpha = 1 reproduces W on the selected entries (fp32 ortho values: to rounding)
        torch.testing.assert_close(eff[mask], W[mask], rtol=0, atol=1e-6)
        # and the residual off the support is untouched base error
        torch.testing.assert_close(layer.effective_weight(0.0), layer.base_stream.dequantize())
    ids = _calib(vocab, 2, 16, seed=9)
    ref = _logits(fp, ids)
    set_alpha(model, 1.0)
    err1 = (_logits(model, ids) - ref).norm()
    set_alpha(model, 0.0)
    err0 = (_logits(model, ids) - ref).norm()
    assert err1 < err0  # the ortho stream brings the model closer to full precision


def test_alpha0_is_bit_identical_to_base_only_model(tiny_llama) -> None:
    vocab = tiny_llama.config.vocab_size
    calib = _calib(vocab)
    with_ortho, base_only = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    libortho.decompose(with_ortho, calib, CFG, progress=False)
    libortho.decompose(base_only, calib, DecomposeConfig(quant=CFG.quant, ortho=False, batch_size=4),
                       progress=False)
    set_alpha(with_ortho, 0.0)
    ids = _calib(vocab, 2, 24, seed=3)
    assert torch.equal(_logits(with_ortho, ids), _logits(base_only, ids))
    set_alpha(with_ortho, 1.0)
    assert not torch.equal(_logits(with_ortho, ids), _logits(base_only, ids))


def test_global_scope_and_reselection(tiny_llama) -> None:
    model = copy.deepcopy(tiny_llama)
    res = libortho.decompose(model, _calib(tiny_llama.config.vocab_size), CFG, keep_records=True,
                             progress=False)
    total = sum(b.shape[0] * b.shape[1] for b in res.base.values())
    glob = select_ortho(res.records, SelectConfig(selector="obs", rho=0.02, scope="global"))
    nnz = sum(o.nnz for o in glob.values())
    assert abs(nnz - 0.02 * total) <= 2  # ties aside, exactly the global fraction
    per_layer = {n: o.density for n, o in glob.items()}
    assert max(per_layer.values()) > min(per_layer.values())  # global scope redistributes
    opt = select_ortho(res.records, SelectConfig(selector="obs", rho=0.02, values="optimal"))
    assert all(o.nnz == round(0.02 * b.shape[0] * b.shape[1]) for o, b in zip(
        opt.values(), res.base.values(), strict=True))


def test_joint_selection_end_to_end(tiny_llama) -> None:
    """select.joint: each layer's support comes from its own GPTQ loop (stacked q/k/v and gate/up split
    back to the right rows), is trimmed/filled to exactly rho, and records rebuild it; bad combinations
    are refused before any work."""
    from libortho.quant import gptq_quantize

    cfg = DecomposeConfig(quant=QuantConfig(bits=4, group_size=32),
                          select=SelectConfig(selector="obs", rho=0.05, joint=True, dtype="fp32"), batch_size=4)
    model = copy.deepcopy(tiny_llama)
    res = libortho.decompose(model, _calib(tiny_llama.config.vocab_size), cfg, keep_records=True, progress=False)
    for name, rec in res.records.items():
        alone = gptq_quantize(rec.weight, cfg.quant, rec.hessian, outliers=0.05)
        assert torch.equal(rec.quant_info["outlier_mask"], alone.info["outlier_mask"]), name
        o = res.ortho[name]
        assert o.nnz == round(0.05 * rec.weight.numel())
        on_joint = (o.to_dense() != 0) & alone.info["outlier_mask"]
        torch.testing.assert_close(o.to_dense()[on_joint], alone.info["outlier_values"][on_joint])
    again = select_ortho(res.records, cfg.select)
    assert all(torch.equal(again[n].to_dense(), res.ortho[n].to_dense()) for n in again)
    plain = libortho.decompose(copy.deepcopy(tiny_llama), _calib(tiny_llama.config.vocab_size), CFG,
                               keep_records=True, progress=False)
    with pytest.raises(ValueError, match="joint selection needs records"):
        select_ortho(plain.records, cfg.select)
    with pytest.raises(ValueError, match="scope 'layer'"):
        SelectConfig(joint=True, scope="global")
    with pytest.raises(ValueError, match="inside GPTQ"):
        DecomposeConfig(quant=QuantConfig(method="rtn"), select=SelectConfig(joint=True))


def test_save_load_roundtrip_and_locked_model(tiny_llama, tmp_path) -> None:
    from libortho.models.tiny import ByteTokenizer

    vocab = tiny_llama.config.vocab_size
    model = copy.deepcopy(tiny_llama)
    libortho.decompose(model, _calib(vocab), CFG, progress=False)
    tok = ByteTokenizer()
    out = libortho.save(model, tmp_path / "dec", config=CFG.to_dict(), tokenizer=tok)
    ids = _calib(vocab, 2, 16, seed=4)
    for alpha in (1.0, 0.0):
        set_alpha(model, alpha)
        loaded, _ = libortho.load(out, alpha=alpha)
        assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    (out / "ortho.safetensors").unlink()
    locked, tok2 = libortho.load(out)
    assert all(a == 0.0 for a in libortho.get_alpha(locked).values())
    with pytest.raises(RuntimeError, match="ortho"):
        set_alpha(locked, 1.0)
    set_alpha(model, 0.0)
    assert torch.equal(_logits(locked, ids), _logits(model, ids))
    enc = tok2("hello", return_tensors="pt")
    gen = locked.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok2.pad_token_id)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 5


def test_bad_inputs_are_refused(tiny_llama) -> None:
    from libortho.models.layers import UnsupportedModelError

    with pytest.raises(ValueError, match="calibration"):
        libortho.decompose(copy.deepcopy(tiny_llama), torch.zeros(4, dtype=torch.long), CFG, progress=False)
    with pytest.raises(ValueError, match="calibration"):
        libortho.decompose(copy.deepcopy(tiny_llama), None, CFG, progress=False)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="Conv1D"):
        libortho.decompose(gpt2, _calib(64), CFG, progress=False)
    with pytest.raises(ValueError, match="rho"):
        SelectConfig(rho=1.5)
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=5)


@pytest.mark.smollm2
def test_smollm2_first_block_end_to_end(smollm2_dir, tmp_path) -> None:
    """Real model: decompose block 0 (GPTQ g64, obs 1%), save, load both ways, generate."""
    from libortho.models import load_model

    model, tok = load_model("smollm2-135m")
    calib = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    cfg = DecomposeConfig(quant=QuantConfig(bits=4, group_size=64), select=SelectConfig(rho=0.01))
    res = libortho.decompose(model, calib, cfg, progress=False, max_blocks=1)
    assert len(res.base) == 7 and all(n.startswith("model.layers.0.") for n in res.base)
    out = libortho.save(model, tmp_path / "smol", config=cfg.to_dict(), tokenizer=tok)
    full, tok2 = libortho.load(out, alpha=1.0)
    locked, _ = libortho.load(out, load_ortho=False)
    ids = tok2("The quick brown fox", return_tensors="pt")["input_ids"]
    set_alpha(full, 0.0)
    assert torch.equal(_logits(full, ids), _logits(locked, ids))
    set_alpha(full, 1.0)
    logits = _logits(full, ids)
    assert torch.isfinite(logits).all() and not torch.equal(logits, _logits(locked, ids))
    gen = full.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4
