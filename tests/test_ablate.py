"""The mathematics of targeted orthogonal ablation, against slow references written here."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from libortho.edit.ablate import (
    apply_weight_edit,
    behaviour_stream_for,
    project_out,
    project_out_rows,
    select_layer_direction,
    writer_sites,
)
from libortho.edit.directions import aggregate_direction, difference_of_means, target_layers, unit_rows
from libortho.models.tiny import build_tiny_llama
from libortho.runtime.behaviour import attach_behaviour
from libortho.streams.behaviour import BehaviourEdit, BehaviourStream


def _unit(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    return (v / v.norm()).float()


def _slow_project(W: torch.Tensor, u: torch.Tensor, lam: float) -> torch.Tensor:
    """Column by column: w_j - lam * <u, w_j> u."""
    out = W.double().clone()
    ud = u.double()
    for j in range(W.shape[1]):
        out[:, j] -= lam * torch.dot(ud, out[:, j]) * ud
    return out.float()


def test_projection_matches_reference_and_is_idempotent() -> None:
    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    u = _unit(24, 1)
    P = project_out(W, u)
    torch.testing.assert_close(P, _slow_project(W, u, 1.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(project_out(P, u), P, atol=1e-5, rtol=1e-5)  # idempotent at strength 1
    assert float((u @ P).abs().max()) < 1e-5  # nothing left along u
    torch.testing.assert_close(project_out(W, u, 0.5), _slow_project(W, u, 0.5), atol=1e-5, rtol=1e-5)
    # strength 2 reflects: applied twice it is the identity
    torch.testing.assert_close(project_out(project_out(W, u, 2.0), u, 2.0), W, atol=1e-4, rtol=1e-4)
    # the orthogonal complement is untouched
    v = torch.randn(24)
    v = v - (v @ u) * u
    torch.testing.assert_close(v @ P, v @ W, atol=1e-4, rtol=1e-4)


def test_output_form_equals_weight_form() -> None:
    W = torch.randn(16, 12)
    b = torch.randn(16)
    x = torch.randn(5, 12)
    u = _unit(16, 3)
    y = x @ W.T + b
    torch.testing.assert_close(project_out_rows(y, u, 0.7), x @ project_out(W, u, 0.7).T + project_out_rows(b, u, 0.7),
                               atol=1e-5, rtol=1e-5)


def test_project_out_refuses_wrong_width() -> None:
    with pytest.raises(ValueError, match="direction has 5 entries"):
        project_out(torch.zeros(4, 3), torch.ones(5) / 5 ** 0.5)


def test_planted_direction_recovered_by_aggregation() -> None:
    """A synthetic difference planted on the late layers (with noise, other layers unrelated) comes back."""
    L, n, d = 10, 400, 32
    g = torch.Generator().manual_seed(0)
    u_true = _unit(d, 7)
    base = torch.randn(L, n, d, generator=g)
    acts_b = base + 0.3 * torch.randn(L, n, d, generator=g)
    acts_a = base[:, torch.randperm(n, generator=g)] + 0.3 * torch.randn(L, n, d, generator=g)
    strength = torch.tensor([0.0] * 7 + [2.0, 3.0, 4.0])
    acts_a = acts_a + strength[:, None, None] * u_true
    diffs = difference_of_means(acts_a, acts_b)
    assert diffs.shape == (L, d)
    u = aggregate_direction(diffs, target_layers(L, 0.7))
    assert float(u @ u_true) > 0.99
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-5)
    # an early layer's own direction is noise, not the planted one
    assert abs(float(unit_rows(diffs)[0] @ u_true)) < 0.6


def test_aggregation_is_the_seed_formula() -> None:
    diffs = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    layers = [3, 4, 5]
    s = [float(diffs[i].norm()) for i in layers]
    vbar = sum(si * diffs[i].double() for si, i in zip(s, layers, strict=True)) / sum(s)
    torch.testing.assert_close(aggregate_direction(diffs, layers), (vbar / vbar.norm()).float(), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="identical means"):
        aggregate_direction(torch.zeros(6, 8), layers)


def test_target_layers() -> None:
    assert target_layers(30) == list(range(21, 30))
    assert target_layers(2) == [1]
    assert target_layers(10, 0.2, 0.5) == [2, 3, 4]
    with pytest.raises(ValueError):
        target_layers(10, 0.8, 0.5)


def _tiny() -> nn.Module:
    return build_tiny_llama(seed=0).float().eval()


def test_rank1_stream_equals_weight_edit_on_a_model() -> None:
    model = _tiny()
    layers = [0, 1]
    stream = behaviour_stream_for(model, torch.randn(model.config.hidden_size), layers, strength=0.8)
    assert set(stream.edits) == set(writer_sites(model, layers))
    ids = torch.randint(0, 250, (3, 17), generator=torch.Generator().manual_seed(0))
    edited = copy.deepcopy(model)
    assert apply_weight_edit(edited, stream) == 4
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        attach_behaviour(model, stream, alpha=1.0)
        streamed = model(input_ids=ids).logits
        weights = edited(input_ids=ids).logits
    torch.testing.assert_close(streamed, weights, atol=1e-4, rtol=1e-4)
    assert float((streamed - plain).abs().max()) > 1e-3  # the edit does something


def test_weight_edit_refuses_tied_embeddings_and_quantized_layers() -> None:
    model = _tiny()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    u = torch.randn(model.config.hidden_size)
    stream = behaviour_stream_for(model, u, [0], embeddings=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="tied to lm_head"):
        apply_weight_edit(model, stream)
    # nothing was edited before the refusal
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    class Quantized(nn.Module):
        out_features = model.config.hidden_size

    model2 = _tiny()
    model2.model.layers[0].mlp.down_proj = Quantized()
    with pytest.raises(ValueError, match="not a dense nn.Linear"):
        apply_weight_edit(model2, BehaviourStream({"model.layers.0.mlp.down_proj": BehaviourEdit.from_vector(u)}))


def test_writer_sites_names_and_errors() -> None:
    model = _tiny()
    assert writer_sites(model, [1]) == ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    assert writer_sites(model, [0], embeddings=True)[0] == "model.embed_tokens"
    with pytest.raises(ValueError, match="outside"):
        writer_sites(model, [5])


def test_select_layer_direction_filters_then_minimises() -> None:
    table = {0: (-1.0, 0.01), 1: (-5.0, 0.5), 2: (-3.0, 0.05), 3: (-9.0, 0.01)}
    chosen, cands = select_layer_direction(4, lambda i: table[i], kl_max=0.1, max_layer_fraction=0.7)
    # layer 1 is over the KL budget, layer 3 past 0.7 L (2.8): layer 2 wins
    assert chosen == 2
    assert [c.kept for c in cands] == [True, False, True, False]
    chosen, _ = select_layer_direction(4, lambda i: (0.0, 1.0), kl_max=0.1)
    assert chosen is None


def test_per_layer_stream_uses_each_layers_own_direction() -> None:
    from libortho.edit.directions import Directions
    from libortho.edit.search import AGGREGATE, PER_LAYER, EditParams
    from libortho.experiments.ablation_eval import edit_stream

    model = _tiny()
    d = model.config.hidden_size
    diffs = torch.randn(2, d, generator=torch.Generator().manual_seed(4))
    dirs = Directions(diffs, aggregate_direction(diffs, [1]), (1,), "last")
    per = edit_stream(model, dirs, EditParams(0, 1, 0.5, PER_LAYER))
    for layer in (0, 1):
        for w in ("self_attn.o_proj", "mlp.down_proj"):
            e = per.edits[f"model.layers.{layer}.{w}"]
            torch.testing.assert_close(e.direction, diffs[layer] / diffs[layer].norm())
            assert e.strength == 0.5
    agg = edit_stream(model, dirs, EditParams(0, 1, 1.0, AGGREGATE))
    assert all(torch.equal(e.direction, dirs.direction) for e in agg.edits.values())
    one = edit_stream(model, dirs, EditParams(1, 1, 1.0, 0))
    assert set(one.edits) == {"model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"}
    torch.testing.assert_close(one.edits["model.layers.1.mlp.down_proj"].direction, diffs[0] / diffs[0].norm())


def test_memory_neurons_are_inside_the_projection() -> None:
    """With memory neurons on an MLP the site is the MLP itself, so what the neurons write is projected too."""
    from libortho.runtime.memory_mlp import attach_neurons
    from libortho.streams import NeuronMemory

    model = _tiny()
    mlp = model.model.layers[1].mlp
    d, g = model.config.hidden_size, torch.Generator().manual_seed(3)
    attach_neurons(model, "model.layers.1.mlp", NeuronMemory.from_weights(
        torch.randn(4, d, generator=g), torch.randn(4, d, generator=g), torch.randn(d, 4, generator=g), "silu"),
        alpha=1.0)
    sites = writer_sites(model, [1])
    assert sites == ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp"]
    u = torch.randn(d, generator=g)
    attach_behaviour(model, behaviour_stream_for(model, u, [1]))
    x = torch.randn(2, 5, d, generator=g)
    with torch.no_grad():
        y = mlp(x)
    assert float((y @ (u / u.norm())).abs().max()) < 1e-4  # neurons included: nothing left along u
