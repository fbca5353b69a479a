"""The behaviour stream: storage, its own switch, composition with base + ortho, files, withholding."""

from __future__ import annotations

import copy

import pytest
import torch

import libortho
from libortho.behaviour_io import BEHAVIOUR_MANIFEST, BEHAVIOUR_TENSORS, read_behaviour, write_behaviour
from libortho.checkpoint import attach_saved_behaviour
from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
from libortho.edit.ablate import behaviour_stream_for, project_out_rows
from libortho.manifest import CorruptDecompositionError
from libortho.models.tiny import build_tiny_llama
from libortho.runtime import set_alpha
from libortho.runtime.behaviour import (
    WITHHELD_MESSAGE,
    attach_behaviour,
    behaviour_scope,
    behaviour_sites,
    behaviour_stream,
    remove_behaviour,
    set_behaviour_alpha,
)
from libortho.streams.behaviour import BehaviourEdit, BehaviourStream

IDS = torch.randint(0, 250, (2, 19), generator=torch.Generator().manual_seed(1))


def _model() -> torch.nn.Module:
    return build_tiny_llama(seed=0).float().eval()


def _stream(model: torch.nn.Module, strength: float = 1.0) -> BehaviourStream:
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    return behaviour_stream_for(model, u, [0, 1], strength, info={"why": "test"})


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_edit_validation() -> None:
    with pytest.raises(ValueError, match="unit norm"):
        BehaviourEdit(torch.ones(4))
    with pytest.raises(ValueError, match="float32"):
        BehaviourEdit(torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="zero"):
        BehaviourEdit.from_vector(torch.zeros(3))
    with pytest.raises(ValueError, match="at least one site"):
        BehaviourStream({})


def test_alpha_zero_is_bit_identical_and_alpha_one_projects() -> None:
    model = _model()
    plain = _logits(model)
    stream = _stream(model)
    attach_behaviour(model, stream, alpha=0.0)
    assert torch.equal(_logits(model), plain)
    set_behaviour_alpha(model, 1.0)
    on = _logits(model)
    assert not torch.allclose(on, plain)
    with behaviour_scope(model, 0.0):
        assert torch.equal(_logits(model), plain)
    assert torch.equal(_logits(model), on)  # the scope restored alpha_b = 1
    # the hook is the projection of the site's output
    site = model.model.layers[1].mlp.down_proj
    x = torch.randn(3, site.in_features)
    with torch.no_grad():
        e = stream.edits["model.layers.1.mlp.down_proj"]
        torch.testing.assert_close(site(x), project_out_rows(x @ site.weight.T, e.direction, e.strength))
    assert remove_behaviour(model) == 4
    assert torch.equal(_logits(model), plain)


def test_deepcopy_keeps_the_hook_and_stream_round_trips() -> None:
    model = _model()
    attach_behaviour(model, _stream(model, 0.6))
    twin = copy.deepcopy(model)
    assert torch.equal(_logits(twin), _logits(model))
    back = behaviour_stream(model)
    assert back is not None and back.info == {"why": "test"}
    assert {n: e.strength for n, e in back.edits.items()} == dict.fromkeys(behaviour_sites(model), 0.6)


def test_withheld_sites_are_locked() -> None:
    model = _model()
    attach_behaviour(model, None, sites=["model.layers.0.self_attn.o_proj"])
    with pytest.raises(RuntimeError, match="withheld"):
        set_behaviour_alpha(model, 1.0)
    assert WITHHELD_MESSAGE.startswith("the behaviour stream")
    with pytest.raises(ValueError, match="writes"):
        attach_behaviour(model, BehaviourStream({"model.layers.0.self_attn.o_proj":
                                                 BehaviourEdit.from_vector(torch.ones(7))}))
    with pytest.raises(KeyError, match="not a module"):
        attach_behaviour(model, BehaviourStream({"model.nope": BehaviourEdit.from_vector(torch.ones(7))}))


def test_file_round_trip_corruption_and_withholding(tmp_path) -> None:
    model = _model()
    stream = _stream(model, 0.9)
    write_behaviour(tmp_path, stream, {"source": "test"})
    found = read_behaviour(tmp_path)
    assert found is not None and not found.withheld
    for n, e in stream.edits.items():
        assert torch.equal(found.stream.edits[n].direction, e.direction)
        assert found.stream.edits[n].strength == e.strength
    fresh = _model()
    assert attach_saved_behaviour(fresh, tmp_path) == 4
    attach_behaviour(model, stream)
    assert torch.equal(_logits(fresh), _logits(model))
    # a flipped byte is refused
    data = bytearray((tmp_path / BEHAVIOUR_TENSORS).read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / BEHAVIOUR_TENSORS).write_bytes(bytes(data))
    with pytest.raises(CorruptDecompositionError, match="SHA-256"):
        read_behaviour(tmp_path)
    # withheld: the manifest stays, the model is the unedited one, locked
    (tmp_path / BEHAVIOUR_TENSORS).unlink()
    other = _model()
    plain = _logits(other)
    assert attach_saved_behaviour(other, tmp_path) == 4
    assert torch.equal(_logits(other), plain)
    with pytest.raises(RuntimeError):
        set_behaviour_alpha(other, 1.0)
    assert (tmp_path / BEHAVIOUR_MANIFEST).is_file()
    assert read_behaviour(tmp_path / "missing") is None


def test_composes_with_base_and_ortho_switches(tmp_path) -> None:
    """base + ortho + behaviour: each switch independent; the behaviour stays a projection at any ortho alpha."""
    model = _model()
    cfg = DecomposeConfig(quant=QuantConfig(bits=4, group_size=32, method="rtn"),
                          select=SelectConfig(selector="magnitude", rho=0.05))
    dec = copy.deepcopy(model)
    libortho.decompose(dec, None, cfg, progress=False)
    stream = _stream(dec)
    outs = {}
    for a in (0.0, 1.0):
        set_alpha(dec, a)
        outs[a] = _logits(dec)
    attach_behaviour(dec, stream)
    seen: dict[str, torch.Tensor] = {}
    hooks = [dec.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
             for n in stream.edits]
    for a in (0.0, 1.0):
        set_alpha(dec, a)  # the ortho switch does not touch the behaviour sites
        _logits(dec)
        for n, e in stream.edits.items():  # at strength 1 every site writes nothing along u, whatever ortho does
            assert float((seen[n].float() @ e.direction).abs().max()) < 1e-3, (a, n)
        assert all(p.alpha == 1.0 for p in behaviour_sites(dec).values())
        on = _logits(dec)
        with behaviour_scope(dec, 0.0):
            assert torch.equal(_logits(dec), outs[a])
        assert not torch.allclose(on, outs[a])
    for h in hooks:
        h.remove()
    # save the decomposition and its behaviour stream; both come back, switches independent
    set_alpha(dec, 1.0)
    want = _logits(dec)
    remove_behaviour(dec)
    libortho.save(dec, tmp_path / "d")
    write_behaviour(tmp_path / "d", stream)
    back, _ = libortho.load(tmp_path / "d", alpha=1.0, base_dtype=torch.float32)
    torch.testing.assert_close(_logits(back), want, atol=1e-4, rtol=1e-4)
    back0, _ = libortho.load(tmp_path / "d", alpha=1.0, base_dtype=torch.float32, behaviour_alpha=0.0)
    torch.testing.assert_close(_logits(back0), outs[1.0], atol=1e-4, rtol=1e-4)


def test_info_and_cli_checks_see_the_behaviour_stream(tmp_path) -> None:
    from libortho.workflows import check_behaviour_alpha, describe

    model = _model()
    cfg = DecomposeConfig(quant=QuantConfig(bits=4, group_size=32, method="rtn"),
                          select=SelectConfig(selector="magnitude", rho=0.05))
    libortho.decompose(model, None, cfg, progress=False)
    libortho.save(model, tmp_path)
    assert describe(tmp_path)["behaviour"] is None
    write_behaviour(tmp_path, _stream(model, 0.5))
    info = describe(tmp_path)["behaviour"]
    assert info == {"sites": 4, "withheld": False, "strengths": [0.5]}
    check_behaviour_alpha(tmp_path, 1.0)
    (tmp_path / BEHAVIOUR_TENSORS).unlink()
    assert describe(tmp_path)["behaviour"]["withheld"] is True
    check_behaviour_alpha(tmp_path, 0.0)  # the unedited model can still run
    with pytest.raises(FileNotFoundError, match="withheld"):
        check_behaviour_alpha(tmp_path, 1.0)
    with pytest.raises(ValueError, match="behaviour alpha"):
        check_behaviour_alpha(tmp_path, 2.0)


def test_save_writes_an_attached_stream_and_dtype_casts_keep_it_fp32(tmp_path) -> None:
    model = _model()
    cfg = DecomposeConfig(quant=QuantConfig(bits=4, group_size=32, method="rtn"),
                          select=SelectConfig(selector="magnitude", rho=0.05))
    libortho.decompose(model, None, cfg, progress=False)
    stream = _stream(model, 0.7)
    attach_behaviour(model, stream)
    libortho.save(model, tmp_path / "d")
    back = read_behaviour(tmp_path / "d")
    assert back is not None and set(back.stream.edits) == set(stream.edits)
    model.to(torch.bfloat16)
    assert all(p.u.dtype == torch.float32 for p in behaviour_sites(model).values())
    assert behaviour_stream(model) is not None  # still unit-norm fp32 directions
