"""Task-vector split: exact reconstruction, one switch per stream, PEFT adapters that reproduce our logits."""

from __future__ import annotations

import copy

import pytest
import torch

from libortho.edit import apply_split, export_lora, split_matrix, split_model
from libortho.models import build_tiny_llama
from libortho.models.layers import find_linears


def pair(move_embeddings: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny Llama with tied embeddings and a 'fine-tuned' copy: each linear moves by rank 2 + small noise."""
    pre = build_tiny_llama(seed=0, tie_word_embeddings=True)
    ft = copy.deepcopy(pre)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lin in find_linears(ft, ("lm_head",)).values():
            d_out, d_in = lin.weight.shape
            lin.weight += 0.05 * torch.randn(d_out, 2, generator=g) @ torch.randn(2, d_in, generator=g)
            lin.weight += 1e-3 * torch.randn(d_out, d_in, generator=g)
        if move_embeddings:
            ft.model.embed_tokens.weight += 0.01 * torch.randn(ft.model.embed_tokens.weight.shape, generator=g)
    return pre, ft


IDS = torch.randint(0, 259, (2, 10), generator=torch.Generator().manual_seed(2))


def logits(m: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=IDS).logits


def test_split_matrix_is_exact_and_cuts_by_rank_or_energy() -> None:
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(8, 2, generator=g) @ torch.randn(2, 6, generator=g) + 1e-3 * torch.randn(8, 6, generator=g)
    s = split_matrix(tau, rank=2)
    assert s.rank == 2 and torch.allclose(s.low() + s.high(), tau, atol=1e-6)
    assert torch.linalg.matrix_rank(s.low(), atol=1e-6) == 2 and s.energy_low > 0.99
    e = split_matrix(tau, energy=s.energy_low + (1 - s.energy_low) / 2)
    assert e.rank > 2  # more energy than the top two hold needs the noise directions
    assert split_matrix(tau, energy=0.5).rank == 1
    assert split_matrix(tau, rank=0).low().abs().max() == 0
    zero = split_matrix(torch.zeros(8, 6), energy=0.9)  # an untouched matrix keeps no direction
    assert zero.rank == 0 and zero.low().abs().max() == 0 and zero.high().abs().max() == 0
    with pytest.raises(ValueError, match="exactly one"):
        split_matrix(tau, rank=1, energy=0.5)


def test_moved_embeddings_must_be_handled_explicitly() -> None:
    pre, ft = pair()
    with pytest.raises(ValueError, match="rest='pre'"):
        split_model(pre, ft, rank=2)
    s = split_model(pre, ft, rank=2, rest="pre")
    assert "model.embed_tokens.weight" in s.summary()["rest_changed"]
    full = apply_split(pre, s, 1.0, 1.0)  # linears as fine-tuned, embeddings as pre-trained
    assert torch.equal(full.model.embed_tokens.weight, pre.model.embed_tokens.weight)


def test_both_switches_on_with_rest_ft_is_the_fine_tuned_model_and_each_switch_acts() -> None:
    pre, ft = pair()
    s = split_model(pre, ft, rank=2, rest="ft")
    assert torch.allclose(logits(apply_split(pre, s, 1.0, 1.0)), logits(ft), atol=1e-4)
    low_only = apply_split(pre, s, 1.0, 0.0)
    for n, lin in find_linears(low_only, ("lm_head",)).items():
        want = dict(pre.named_modules())[n].weight + s.layers[n].low()
        assert torch.allclose(lin.weight, want, atol=1e-6), n
    assert not torch.allclose(logits(low_only), logits(ft), atol=1e-4)


@pytest.mark.parametrize("rest", ["pre", "ft"])
def test_peft_loads_both_parts_and_reproduces_our_logits(tmp_path, rest: str) -> None:
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    pre, ft = pair(move_embeddings=(rest == "ft"))
    s = split_model(pre, ft, energy=0.9, rest=rest)
    for part, (a, b) in (("low", (1.0, 0.0)), ("high", (0.0, 1.0))):
        out = export_lora(s, part, tmp_path / part, pre=pre)
        base = LlamaForCausalLM.from_pretrained(out / "base") if rest == "ft" else copy.deepcopy(pre)
        model = peft.PeftModel.from_pretrained(base.eval(), str(out)).eval()
        assert torch.allclose(logits(model), logits(apply_split(pre, s, a, b)), atol=1e-4), part
    with pytest.raises(ValueError, match="part"):
        export_lora(s, "mid", tmp_path / "x")
