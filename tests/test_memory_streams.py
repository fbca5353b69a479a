"""Memory streams of three forms (sparse, low-rank, neurons) behind one alpha switch and one file format."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import libortho
from libortho.checkpoint import split_state
from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
from libortho.io import CorruptDecompositionError, read_decomposition, write_decomposition
from libortho.quant import rtn_quantize
from libortho.runtime import (
    LOCKED_MESSAGE,
    MemoryNeurons,
    OrthoLinear,
    alpha_scope,
    attach_memory,
    attach_neurons,
    get_alpha,
    ortho_layers,
    remove_neurons,
    set_alpha,
    switchable_layers,
)
from libortho.runtime.kernels import cpu
from libortho.streams import (
    LowRankMemory,
    NeuronMemory,
    SparseOrtho,
)

MLP0, MLP1 = "model.layers.0.mlp", "model.layers.1.mlp"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lowrank(d_out: int, d_in: int, r: int, seed: int = 0, scale: float = 0.3, dtype: str = "fp32") -> LowRankMemory:
    g = _gen(seed)
    return LowRankMemory.from_factors(torch.randn(d_out, r, generator=g) * scale,
                                      torch.randn(r, d_in, generator=g) * scale, dtype)


def _neurons(d: int, k: int, seed: int = 0, scale: float = 0.5, dtype: str = "fp32",
             activation: str = "silu") -> NeuronMemory:
    g = _gen(seed)
    return NeuronMemory.from_weights(torch.randn(k, d, generator=g) * scale, torch.randn(k, d, generator=g) * scale,
                                     torch.randn(d, k, generator=g) * scale, activation, dtype)


# ---------------------------------------------------------------- runtime, linear site


def _base(d_out: int, d_in: int, seed: int = 0) -> tuple[torch.Tensor, object]:
    W = torch.randn(d_out, d_in, generator=_gen(seed)) * 0.05
    return W, rtn_quantize(W, QuantConfig(bits=4, group_size=32, method="rtn")).to_stream()


@pytest.mark.parametrize("d_out,d_in,r", [(64, 64, 3), (48, 96, 5)])  # square: a transposed factor would run
def test_lowrank_layer_matches_dense_reference(d_out, d_in, r) -> None:
    _, base = _base(d_out, d_in)
    mem = _lowrank(d_out, d_in, r, seed=1)
    layer, plain = OrthoLinear(base, mem, alpha=1.0), OrthoLinear(base, None)
    x = torch.randn(2, 7, d_in, generator=_gen(2))
    Q, D = base.dequantize(), mem.to_dense()
    for alpha in (1.0, 0.4, -2.0):
        layer.alpha = alpha
        y, y0 = layer(x), plain(x)
        # the memory part is exact up to fp32 rounding; the base part carries the INT4 kernel's bf16 rounding
        torch.testing.assert_close(y - y0, alpha * x @ D.t(), rtol=1e-4, atol=1e-5)
        ref = x @ (Q + alpha * D).t()
        assert float((y - ref).norm() / ref.norm()) < 1e-2
        torch.testing.assert_close(layer.effective_weight(), Q + alpha * D)
    layer.alpha = 0.0
    assert torch.equal(layer(x), plain(x))  # the null test
    layer.alpha = 1.0
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert "memory=lowrank, rank=" + str(r) in repr(layer)


def test_lowrank_layer_null_test_never_reads_the_stream(monkeypatch) -> None:
    _, base = _base(32, 64)
    layer = OrthoLinear(base, _lowrank(32, 64, 2), alpha=0.0)
    x = torch.randn(3, 64, generator=_gen(1))

    def boom(*_a, **_k):
        raise AssertionError("memory touched at alpha = 0")

    monkeypatch.setattr(cpu, "lowrank_addmm_", boom)
    assert torch.equal(layer(x), OrthoLinear(base, None)(x))
    layer.alpha = 1.0
    with pytest.raises(AssertionError, match="touched"):
        layer(x)


def test_lowrank_layer_dtype_copy_and_detach() -> None:
    _, base = _base(32, 64)
    mem = _lowrank(32, 64, 4, seed=3)
    layer = OrthoLinear(base, mem, torch.randn(32), alpha=1.0)
    x = torch.randn(5, 64, generator=_gen(4))
    want = layer(x)
    clone = copy.deepcopy(layer)
    layer.to(torch.bfloat16)
    assert layer._lr_A.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(clone(x), want)
    clone.set_ortho(None)
    assert clone.locked and clone.alpha == 0.0 and clone._lr_A is None
    with pytest.raises(RuntimeError, match="not loaded"):
        clone.alpha = 1.0
    clone.set_ortho(SparseOrtho.empty((32, 64)))  # switching forms drops the low-rank kernel tensors
    assert clone._lr_A is None and clone._csr is not None
    with pytest.raises(ValueError, match="does not match layer"):
        clone.set_ortho(_lowrank(64, 32, 2))
    with pytest.raises(TypeError, match="NeuronMemory"):
        clone.set_ortho(_neurons(64, 2))


# ---------------------------------------------------------------- runtime, mlp site


def _tiny() -> torch.nn.Module:
    from libortho.models import build_tiny_llama

    return build_tiny_llama(seed=0)


def _wide_mlp_reference(mlp: torch.nn.Module, mem: NeuronMemory, alpha: float, x: torch.Tensor) -> torch.Tensor:
    """The MLP with the memory neurons appended as k more hidden units (down columns scaled by alpha)."""
    gate = torch.cat([mlp.gate_proj.weight, mem.gate.float()])
    up = torch.cat([mlp.up_proj.weight, mem.up.float()])
    down = torch.cat([mlp.down_proj.weight, alpha * mem.down.float()], dim=1)
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def test_neurons_match_a_wider_mlp_and_keep_names() -> None:
    model = _tiny()
    mlp = model.get_submodule(MLP0)
    keys_before = list(model.state_dict())
    x = torch.randn(2, 5, 64, generator=_gen(1))
    plain = mlp(x)
    mem = _neurons(64, 6, seed=2)
    module = attach_neurons(model, MLP0, mem, alpha=1.0)
    assert isinstance(module, MemoryNeurons) and model.get_submodule(MLP0 + ".memory") is module
    assert isinstance(model.get_submodule(MLP0 + ".up_proj"), torch.nn.Linear)
    assert list(model.state_dict()) == keys_before  # nothing of the memory in state_dict
    for alpha in (1.0, 0.5, -1.5):
        set_alpha(model, alpha, pattern="mlp")
        torch.testing.assert_close(mlp(x), _wide_mlp_reference(mlp, mem, alpha, x), rtol=1e-5, atol=2e-5)
    set_alpha(model, 0.0)
    assert torch.equal(mlp(x), plain)
    attach_neurons(model, MLP0, mem, alpha=1.0)  # attaching again replaces, never adds a second hook
    assert len(mlp._forward_hooks) == 1
    torch.testing.assert_close(mlp(x), _wide_mlp_reference(mlp, mem, 1.0, x), rtol=1e-5, atol=2e-5)
    assert "memory=neurons, k=6" in repr(module)


def test_neurons_null_test_never_reads_the_stream(monkeypatch) -> None:
    model = _tiny()
    ids = torch.randint(1, 259, (2, 8), generator=_gen(3))
    with torch.no_grad():
        before = model(ids).logits
    attach_neurons(model, MLP0, _neurons(64, 4), alpha=0.0)
    attach_neurons(model, MLP1, _neurons(64, 4, seed=1), alpha=0.0)

    def boom(*_a, **_k):
        raise AssertionError("memory touched at alpha = 0")

    monkeypatch.setattr(cpu, "gated_neurons", boom)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
        set_alpha(model, 1.0)
        with pytest.raises(AssertionError, match="touched"):
            model(ids)


def test_neurons_alpha_lock_detach_and_remove() -> None:
    model = _tiny()
    mlp = model.get_submodule(MLP0)
    x = torch.randn(3, 64, generator=_gen(5))
    plain = mlp(x)
    attach_neurons(model, MLP0, _neurons(64, 4), alpha=1.0)
    attach_neurons(model, MLP1, _neurons(64, 4, seed=1), alpha=1.0)
    assert get_alpha(model) == {MLP0 + ".memory": 1.0, MLP1 + ".memory": 1.0}
    with alpha_scope(model, 0.0):
        assert torch.equal(mlp(x), plain)
    assert not torch.equal(mlp(x), plain)
    locked = attach_neurons(model, MLP1, None)  # detaching locks
    assert locked.locked and locked.alpha == 0.0
    with pytest.raises(RuntimeError, match="not loaded"):
        set_alpha(model, 0.5)
    assert get_alpha(model) == {MLP0 + ".memory": 1.0, MLP1 + ".memory": 0.0}  # all-or-nothing
    with pytest.raises(RuntimeError, match="not loaded"):
        locked.alpha = 1.0
    with pytest.raises(RuntimeError, match="not loaded"):
        locked(x)
    removed = remove_neurons(model, MLP0)
    assert removed.alpha == 1.0 and not hasattr(mlp, "memory") and len(mlp._forward_hooks) == 0
    assert torch.equal(mlp(x), plain)
    with pytest.raises(KeyError, match="no memory neurons"):
        remove_neurons(model, MLP0)
    assert LOCKED_MESSAGE.startswith("the ortho stream")


def test_neurons_attach_refusals() -> None:
    model = _tiny()
    with pytest.raises(ValueError, match="unknown activation 'not_an_act'"):
        attach_neurons(model, MLP0, _neurons(64, 2, activation="not_an_act"))
    with pytest.raises(ValueError, match="width 32 does not fit"):
        attach_neurons(model, MLP0, _neurons(32, 2))
    model.get_submodule(MLP0).memory = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="already has a child 'memory'"):
        attach_neurons(model, MLP0, _neurons(64, 2))
    with pytest.raises(TypeError, match="NeuronMemory"):
        MemoryNeurons(_lowrank(4, 4, 1))


def test_deepcopy_and_dtype_keep_neuron_behaviour() -> None:
    model = _tiny()
    attach_neurons(model, MLP0, _neurons(64, 4), alpha=1.0)
    attach_neurons(model, MLP1, _neurons(64, 4, seed=1), alpha=1.0)
    ids = torch.randint(1, 259, (2, 8), generator=_gen(6))
    with torch.no_grad():
        on = model(ids).logits
        set_alpha(model, 0.0)
        off = model(ids).logits
        set_alpha(model, 1.0)
        clone = copy.deepcopy(model)
        assert torch.equal(clone(ids).logits, on) and not torch.equal(on, off)
        set_alpha(clone, 0.0)  # the copy's switch is its own
        assert torch.equal(clone(ids).logits, off) and torch.equal(model(ids).logits, on)
        remove_neurons(clone, MLP0)  # and so are its hooks
        assert len(model.get_submodule(MLP0)._forward_hooks) == 1
        model.to(torch.bfloat16)
        mem = model.get_submodule(MLP0 + ".memory")
        assert mem._gate.dtype == torch.float32 and mem.alpha == 1.0
        half = model(ids).logits
        assert half.dtype == torch.bfloat16 and float((half.float() - on).abs().max()) < 0.1
        set_alpha(model, 0.0)
        assert float((model(ids).logits.float() - off).abs().max()) < 0.1


# ---------------------------------------------------------------- files


def _decomposed(ortho: bool = True) -> torch.nn.Module:
    model = _tiny()
    calib = torch.randint(0, 256, (2, 16), generator=_gen(0))
    cfg = DecomposeConfig(quant=QuantConfig(bits=4, group_size=32, method="rtn"),
                          select=SelectConfig(selector="magnitude", rho=0.05), ortho=ortho)
    libortho.decompose(model, calib, cfg, progress=False)
    return model


def _memory_model(form: str) -> torch.nn.Module:
    """A decomposed tiny Llama whose memory is of one form ("sparse", "lowrank", "neurons") or "mixed"."""
    model = _decomposed(ortho=form in ("sparse", "mixed"))
    streams: dict[str, object] = {}
    layers = ortho_layers(model)
    for i, (name, layer) in enumerate(layers.items()):
        if form == "lowrank" or (form == "mixed" and i % 2):
            streams[name] = _lowrank(layer.out_features, layer.in_features, 2 + i % 3, seed=i, dtype="bf16")
    if form in ("neurons", "mixed"):
        streams[MLP0] = _neurons(64, 5, seed=10, dtype="fp16")
        streams[MLP1] = _neurons(64, 3, seed=11, dtype="fp32")
    attach_memory(model, streams, alpha=1.0)
    return model


def _logits(model: torch.nn.Module, ids: torch.Tensor, alpha: float) -> torch.Tensor:
    set_alpha(model, alpha)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("form", ["sparse", "lowrank", "neurons", "mixed"])
def test_round_trip_and_withholding_for_every_form(tmp_path, form) -> None:
    model = _memory_model(form)
    ids = torch.randint(1, 259, (2, 10), generator=_gen(7))
    on, off = _logits(model, ids, 1.0), _logits(model, ids, 0.0)
    assert not torch.equal(on, off)  # the memory does something, so the comparisons below can fail
    out = libortho.save(model, tmp_path / "dec")
    m = json.loads((out / "libortho.json").read_text())
    assert m["format_version"] == 3 and m["has_ortho"]
    kinds = {meta["kind"] for meta in m["memory"].values()}
    assert kinds == {"sparse": {"sparse"}, "lowrank": {"lowrank"}, "neurons": {"sparse", "neurons"},
                     "mixed": {"sparse", "lowrank", "neurons"}}[form]
    assert all(m["layers"][n]["memory_kind"] == meta["kind"] for n, meta in m["memory"].items() if n in m["layers"])
    loaded, _ = libortho.load(out, alpha=1.0)
    assert torch.equal(_logits(loaded, ids, 1.0), on) and torch.equal(_logits(loaded, ids, 0.0), off)
    assert set(switchable_layers(loaded)) == set(switchable_layers(model))
    (out / "ortho.safetensors").unlink()  # withheld: a valid model, locked at alpha = 0 for every form
    locked, _ = libortho.load(out, alpha=1.0)
    assert all(m.locked for m in switchable_layers(locked).values())
    assert set(switchable_layers(locked)) == set(switchable_layers(model))
    assert set(get_alpha(locked).values()) == {0.0}
    with torch.no_grad():
        assert torch.equal(locked(ids).logits, off)
    with pytest.raises(RuntimeError, match="not loaded"):
        set_alpha(locked, 1.0)


def test_mixed_files_hold_every_form_by_name(tmp_path) -> None:
    from safetensors import safe_open

    model = _memory_model("mixed")
    base, ortho, rest = split_state(model)
    assert isinstance(ortho[MLP0], NeuronMemory) and MLP0 not in base
    assert not any(".memory." in k for k in rest)
    out = libortho.save(model, tmp_path / "dec")
    with safe_open(out / "ortho.safetensors", "pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    want = {f"{n}.{t}" for n, o in ortho.items() for t in o.tensor_names}
    assert keys == want and {MLP0 + ".gate", MLP0 + ".up", MLP0 + ".down"} <= keys
    dec = read_decomposition(out)
    for n, o in ortho.items():
        got = dec.ortho[n]
        assert type(got) is type(o) and all(torch.equal(got.tensors()[k], v) for k, v in o.tensors().items())
    assert dec.memory[MLP1] == {"kind": "neurons", "site": "mlp", "n_neurons": 3, "d_model": 64, "dtype": "fp32",
                                "activation": "silu"}
    from libortho.workflows import bits_summary, describe

    summary = bits_summary(base, ortho)
    want_params = sum(o.nnz if isinstance(o, SparseOrtho) else o.rank * sum(o.shape) if isinstance(o, LowRankMemory)
                      else 3 * o.n_neurons * o.d_model for o in ortho.values())
    assert summary["memory_params"] == want_params and summary["memory_bytes"] == sum(o.nbytes for o in ortho.values())
    assert summary["memory_kinds"] == {"lowrank": 7, "neurons": 2, "sparse": 7}
    assert summary["ortho_density"] == sum(o.nnz for o in ortho.values() if isinstance(o, SparseOrtho)) / \
        summary["quantized_params"]
    d = describe(out)
    assert [r["name"] for r in d["mlp_memory"]] == [MLP0, MLP1] and d["memory_kinds"] == summary["memory_kinds"]
    rows = {r["name"]: r for r in d["layers"]}
    assert {r["memory_kind"] for r in rows.values()} == {"sparse", "lowrank"}
    assert all(r["nnz"] == 0 for r in rows.values() if r["memory_kind"] == "lowrank")


def test_write_refuses_streams_that_do_not_fit(tmp_path) -> None:
    base, ortho, rest = split_state(_memory_model("mixed"))
    q = "model.layers.0.self_attn.q_proj"
    for bad, match in (({q: _lowrank(64, 32, 2)}, "has shape"),
                       ({"model.layers.7.self_attn.q_proj": _lowrank(64, 64, 2)}, "no base stream"),
                       ({q: _neurons(64, 2)}, "belongs to an MLP"),
                       ({MLP0: _neurons(32, 2)}, r"width 32, model.layers.0.mlp.up_proj has d_model 64"),
                       ({MLP0: torch.zeros(2)}, "not one of")):
        with pytest.raises(ValueError, match=match):
            write_decomposition(tmp_path / "dec", base, {**ortho, **bad}, rest, {}, {})
        assert not (tmp_path / "dec").exists()


def _rewrite_manifest(out, edit) -> None:
    m = json.loads((out / "libortho.json").read_text())
    edit(m)
    (out / "libortho.json").write_text(json.dumps(m))


@pytest.mark.parametrize(("edit", "match"), [
    (lambda m: m.update(format_version=4), "unsupported format version 4 .this libortho reads 1, 2, 3."),
    (lambda m: m["memory"][MLP0].update(kind="dora"), "memory stream 'model.layers.0.mlp' has unknown kind 'dora'"),
    (lambda m: m["memory"][MLP0].update(site="linear"), "has site 'linear', expected 'mlp'"),
    (lambda m: m.pop("memory"), "has no 'memory' table"),
    (lambda m: m["memory"][MLP0].update(n_neurons=9), "metadata says 9"),
])
def test_unknown_versions_and_kinds_are_corrupt(tmp_path, edit, match) -> None:
    out = libortho.save(_memory_model("neurons"), tmp_path / "dec")
    _rewrite_manifest(out, edit)
    with pytest.raises(CorruptDecompositionError, match=match) as err:
        read_decomposition(out)
    assert "\n" not in str(err.value)


def test_attach_memory_dispatches_and_fills_memoryless_linears(tmp_path) -> None:
    model = _decomposed(ortho=False)
    q = "model.layers.0.self_attn.q_proj"
    with pytest.raises(KeyError, match="not an OrthoLinear"):
        attach_memory(model, {MLP0: _lowrank(64, 64, 2)})
    with pytest.raises(TypeError, match="not a memory stream"):
        attach_memory(model, {q: torch.zeros(2)})
    assert attach_memory(model, {q: _lowrank(64, 64, 2)}, alpha=0.5, fill_empty=False) == 1
    assert sum(not m.locked for m in ortho_layers(model).values()) == 1
    with pytest.raises(RuntimeError, match="not loaded"):
        set_alpha(model, 1.0)  # the other layers have no memory and were not filled
    attach_memory(model, {MLP1: _neurons(64, 2)}, alpha=0.5)
    layers = switchable_layers(model)
    assert len(layers) == 15 and not any(m.locked for m in layers.values())
    assert all(m.ortho_stream.nnz == 0 for n, m in ortho_layers(model).items() if n != q)
    assert set_alpha(model, 1.0) == 15


def test_load_gives_layers_without_memory_an_empty_stream(tmp_path) -> None:
    """A file whose memory names a few layers loads unlocked; only withholding locks."""
    model = _decomposed(ortho=False)
    base, _, rest = split_state(model)
    q = "model.layers.0.self_attn.q_proj"
    out = write_decomposition(tmp_path / "dec", base, {q: _lowrank(64, 64, 2)}, rest, {}, {},
                              hf_config=model.config.to_dict())
    layers = json.loads((out / "libortho.json").read_text())["layers"]
    assert layers[q]["memory_kind"] == "lowrank" and layers[MLP0 + ".up_proj"]["memory_kind"] is None
    loaded, _ = libortho.load(out, alpha=1.0)
    assert set(get_alpha(loaded).values()) == {1.0}
    assert isinstance(loaded.get_submodule(q).ortho_stream, LowRankMemory)
