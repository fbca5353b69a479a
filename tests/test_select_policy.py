"""The selection policy with K-FAC curvature wired through ``decompose``: SelectConfig(curvature="kfac").

References are written here from first principles: the obs score under K-FAC is R_ij^2 over the
diagonal of the inverse of the damped Kronecker product (a dense (d_out d_in)^2 matrix inverted
outright), and the factored stream is checked against its bit budget and the null test.
"""

from __future__ import annotations

import copy

import pytest
import torch

from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
from libortho.curvature.kfac import fit_kfac
from libortho.models.layers import block_linear_names
from libortho.pipeline import decompose
from libortho.streams import LowRankMemory, SparseOrtho

QUANT = QuantConfig(bits=4, group_size=32, method="gptq", grid="minmax", act_order=False)


def calib(n: int = 8, L: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (n, L), generator=torch.Generator().manual_seed(seed))


def small_llama():
    from libortho.models import build_tiny_llama

    return build_tiny_llama(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)


def factors_of(model, ids: torch.Tensor, batch: int = 8) -> dict:
    names = block_linear_names(model)
    return fit_kfac(model, [ids[i:i + batch] for i in range(0, ids.shape[0], batch)],
                    {n: model.get_submodule(n) for n in names}, fisher="true")


def test_config_refuses_inconsistent_kfac_choices() -> None:
    with pytest.raises(ValueError, match="curvature='kfac'"):
        SelectConfig(selector="kfac")
    with pytest.raises(ValueError, match="curvature must be"):
        SelectConfig(curvature="fisher")
    with pytest.raises(ValueError, match="values='optimal'"):
        SelectConfig(curvature="kfac", values="optimal")
    with pytest.raises(ValueError, match="scope 'layer'"):
        SelectConfig(selector="kfac", curvature="kfac", scope="global")
    with pytest.raises(ValueError, match="kfac_damp"):
        SelectConfig(curvature="kfac", kfac_damp=0.0)
    with pytest.raises(ValueError, match="unknown selector"):
        SelectConfig(selector="kfca", curvature="kfac")


def dense_obs_under_kfac(R: torch.Tensor, A: torch.Tensor, G: torch.Tensor, damp: float) -> torch.Tensor:
    """R_ij^2 / [(G_d kron A_d)^-1]_(ij),(ij), each factor damped by damp x its mean eigenvalue."""
    Gd = G + damp * torch.trace(G) / G.shape[0] * torch.eye(G.shape[0], dtype=G.dtype)
    Ad = A + damp * torch.trace(A) / A.shape[0] * torch.eye(A.shape[0], dtype=A.dtype)
    inv = torch.linalg.inv(torch.kron(Gd, Ad))  # row-major vec(R): index i * d_in + j
    return R.double() ** 2 / torch.diagonal(inv).view(R.shape)


def test_obs_under_kfac_in_decompose_matches_the_dense_kronecker_reference() -> None:
    model, ids = small_llama(), calib()
    f = factors_of(model, ids)
    ref_model = copy.deepcopy(model)
    cfg = DecomposeConfig(quant=QUANT, select=SelectConfig(selector="obs", rho=0.05, curvature="kfac"))
    res = decompose(model, ids, cfg, progress=False, kfac=f)
    base_only = decompose(ref_model, ids, DecomposeConfig(quant=QUANT, ortho=False), progress=False)
    name = "model.layers.0.self_attn.q_proj"
    W = small_llama().get_submodule(name).weight.detach()
    R = W.float() - base_only.base[name].dequantize()
    scores = dense_obs_under_kfac(R, f[name].A, f[name].G, 0.1)
    k = int(round(0.05 * R.numel()))
    expected = torch.zeros(R.numel(), dtype=torch.bool)
    expected[scores.flatten().topk(k).indices] = True
    o = res.ortho[name]
    assert isinstance(o, SparseOrtho) and o.nnz == k
    got = torch.zeros(R.numel(), dtype=torch.bool)
    got[o.indices.long()] = True
    assert torch.equal(got, expected)
    assert res.stats["curvature"] == "kfac"


def test_factors_fitted_inside_decompose_equal_the_ones_given() -> None:
    ids = calib()
    cfg = DecomposeConfig(quant=QUANT, select=SelectConfig(selector="diag", rho=0.05, curvature="kfac"),
                          batch_size=4)
    a, b = small_llama(), small_llama()
    f = factors_of(small_llama(), ids, batch=4)
    ra = decompose(a, ids, cfg, progress=False)
    rb = decompose(b, ids, cfg, progress=False, kfac=f)
    for n in ra.ortho:
        assert torch.equal(ra.ortho[n].indices, rb.ortho[n].indices), n
        assert "kfac" in ra.stats["phase_s"]


def test_factored_kfac_stream_fits_the_sparse_budget_and_switches_off_exactly(tmp_path) -> None:
    from libortho.checkpoint import load, save
    from libortho.runtime import set_alpha

    ids = calib()
    model = small_llama()
    cfg = DecomposeConfig(quant=QUANT, select=SelectConfig(selector="kfac", rho=0.2, curvature="kfac"))
    res = decompose(model, ids, cfg, progress=False)
    sparse = decompose(small_llama(), ids, DecomposeConfig(quant=QUANT, select=SelectConfig(
        selector="obs", rho=0.2, curvature="kfac")), progress=False, kfac=None)
    assert any(isinstance(o, LowRankMemory) for o in res.ortho.values())
    for n, o in res.ortho.items():
        assert o.nbytes <= sparse.ortho[n].nbytes, n  # never more bits than the sparse stream of the same rho
    base_only = small_llama()
    decompose(base_only, ids, DecomposeConfig(quant=QUANT, ortho=False), progress=False)
    probe = ids[:2]
    set_alpha(model, 0.0)
    with torch.no_grad():
        assert torch.equal(model(probe).logits, base_only(probe).logits)  # the null test
        set_alpha(model, 1.0)
        on = model(probe).logits
    save(model, tmp_path / "d", config=cfg.to_dict())
    again, _ = load(tmp_path / "d", alpha=1.0)
    with torch.no_grad():
        torch.testing.assert_close(again(probe).logits, on, rtol=0, atol=1e-5)
    assert not torch.equal(on, base_only(probe).logits)


def test_missing_or_misshapen_factors_are_refused_before_quantizing() -> None:
    ids = calib()
    f = factors_of(small_llama(), ids)
    name = next(iter(f))
    partial = {k: v for k, v in f.items() if k != name}
    cfg = DecomposeConfig(quant=QUANT, select=SelectConfig(selector="obs", curvature="kfac"))
    with pytest.raises(ValueError, match="miss 1 of the layers"):
        decompose(small_llama(), ids, cfg, progress=False, kfac=partial)
    other = next(k for k in f if f[k].shape != f[name].shape)
    with pytest.raises(ValueError, match="are for"):
        decompose(small_llama(), ids, cfg, progress=False, kfac={**f, name: f[other]})
