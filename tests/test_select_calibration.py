"""decompose(select_calibration=...): the selector scores with its own data; the base stream never sees it."""

import copy

import pytest
import torch

import libortho
from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
from libortho.pipeline import make_ortho, select_ortho
from libortho.runtime import set_alpha

CFG = DecomposeConfig(quant=QuantConfig(bits=4, group_size=32), select=SelectConfig(rho=0.05, dtype="fp32"),
                      batch_size=4)
Q_PROJ = "model.layers.0.self_attn.q_proj"  # its input does not depend on any decomposed layer


def _ids(n: int, L: int, seed: int, lo: int = 0, hi: int = 256) -> torch.Tensor:
    return torch.randint(lo, hi, (n, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def _same_base(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        assert torch.equal(x.packed, y.packed) and torch.equal(x.scales, y.scales), name
        assert torch.equal(x.zeros, y.zeros) and (x.bits, x.group_size, x.shape) == (y.bits, y.group_size, y.shape)


def _same_ortho(a, b) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[n].indices, b[n].indices) and torch.equal(a[n].values, b[n].values) for n in a)


def _support(o) -> set[int]:
    return set(o.indices.tolist())


@pytest.fixture(scope="module")
def runs():
    """One plain decomposition and one whose selector scores with other (low-byte 'private') token ids."""
    from libortho.models import build_tiny_llama

    fp = build_tiny_llama(seed=0)
    calib, private = _ids(8, 32, seed=0), _ids(6, 24, seed=1, lo=0, hi=48)
    plain, with_sel = copy.deepcopy(fp), copy.deepcopy(fp)
    res_plain = libortho.decompose(plain, calib, CFG, keep_records=True, progress=False)
    res_sel = libortho.decompose(with_sel, calib, CFG, keep_records=True, progress=False, select_calibration=private)
    return dict(fp=fp, calib=calib, private=private, plain=(plain, res_plain), sel=(with_sel, res_sel))


def test_base_streams_and_alpha0_logits_are_unchanged(runs) -> None:
    (plain, res_plain), (with_sel, res_sel) = runs["plain"], runs["sel"]
    _same_base(res_plain.base, res_sel.base)
    for name, rec in res_plain.records.items():  # the base calibration's curvature is the same too
        assert torch.equal(rec.hessian, res_sel.records[name].hessian), name
    ids = _ids(2, 20, seed=5)
    set_alpha(plain, 0.0)
    set_alpha(with_sel, 0.0)
    try:
        assert torch.equal(_logits(plain, ids), _logits(with_sel, ids))
    finally:
        set_alpha(plain, 1.0)
        set_alpha(with_sel, 1.0)


def test_ortho_support_follows_the_selection_data(runs) -> None:
    res_plain, res_sel = runs["plain"][1], runs["sel"][1]
    assert res_plain.ortho.keys() == res_sel.ortho.keys() == res_plain.base.keys()
    differ = [n for n in res_plain.ortho if _support(res_plain.ortho[n]) != _support(res_sel.ortho[n])]
    assert len(differ) >= len(res_plain.ortho) // 2, differ
    for n, o in res_sel.ortho.items():  # same budget, another support
        assert o.nnz == res_plain.ortho[n].nnz
    # the alpha=1 models differ accordingly
    ids = _ids(2, 20, seed=6)
    assert not torch.equal(_logits(runs["plain"][0], ids), _logits(runs["sel"][0], ids))


def test_selection_hessian_is_the_selection_datas_curvature(runs) -> None:
    res_plain, res_sel = runs["plain"][1], runs["sel"][1]
    assert all(r.select_hessian is None for r in res_plain.records.values())
    for name, rec in res_sel.records.items():
        assert rec.select_hessian is not None and rec.selection_hessian is rec.select_hessian
        assert not torch.equal(rec.select_hessian, rec.hessian), name
        # the stored ortho stream is what the selector makes from the selection Hessian
        again = make_ortho(rec.weight, rec.base, rec.select_hessian, CFG.select)
        assert torch.equal(again.indices, res_sel.ortho[name].indices), name
    # block 0's attention input is independent of any decomposition: its selection Hessian equals the
    # base Hessian of a plain run calibrated on the selection data
    other = libortho.decompose(copy.deepcopy(runs["fp"]), runs["private"], CFG, keep_records=True, progress=False,
                               max_blocks=1)
    torch.testing.assert_close(res_sel.records[Q_PROJ].select_hessian, other.records[Q_PROJ].hessian,
                               rtol=1e-6, atol=1e-6)
    # and re-selection (select_ortho) scores with it too
    assert _same_ortho(select_ortho(res_sel.records, CFG.select), res_sel.ortho)


def test_stats_count_selection_tokens(runs) -> None:
    assert runs["plain"][1].stats["select_calib_tokens"] == 0
    assert runs["sel"][1].stats["select_calib_tokens"] == runs["private"].numel() == 6 * 24
    assert runs["sel"][1].stats["calib_tokens"] == runs["calib"].numel()


def test_selecting_with_the_calibration_itself_changes_nothing(tiny_llama) -> None:
    calib = _ids(8, 32, seed=0)
    a, b = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    ra = libortho.decompose(a, calib, CFG, progress=False)
    rb = libortho.decompose(b, calib, CFG, progress=False, select_calibration=calib.clone())
    _same_base(ra.base, rb.base)
    assert _same_ortho(ra.ortho, rb.ortho)


def test_global_scope_uses_the_selection_data(tiny_llama) -> None:
    cfg = DecomposeConfig(quant=CFG.quant, select=SelectConfig(rho=0.03, scope="global", dtype="fp32"),
                          batch_size=4)
    calib, private = _ids(8, 32, seed=0), _ids(6, 24, seed=1, hi=48)
    a, b = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    ra = libortho.decompose(a, calib, cfg, progress=False)
    rb = libortho.decompose(b, calib, cfg, progress=False, select_calibration=private)
    _same_base(ra.base, rb.base)
    assert not _same_ortho(ra.ortho, rb.ortho)
    total = sum(x.shape[0] * x.shape[1] for x in ra.base.values())
    assert abs(sum(o.nnz for o in rb.ortho.values()) - 0.03 * total) <= 2
    assert rb.records == {}  # records kept internally for global scope are not returned


def test_select_calibration_needs_an_ortho_stream(tiny_llama) -> None:
    calib, private = _ids(4, 32, seed=0), _ids(2, 16, seed=1)
    base_only = DecomposeConfig(quant=CFG.quant, ortho=False, batch_size=4)
    with pytest.raises(ValueError, match="select_calibration needs an ortho stream"):
        libortho.decompose(copy.deepcopy(tiny_llama), calib, base_only, progress=False, select_calibration=private)
    rtn_magnitude = DecomposeConfig(quant=QuantConfig(bits=4, group_size=32, method="rtn"),
                                    select=SelectConfig(selector="magnitude", rho=0.05), batch_size=4)
    with pytest.raises(ValueError, match="select_calibration"):
        libortho.decompose(copy.deepcopy(tiny_llama), calib, rtn_magnitude, progress=False,
                           select_calibration=private)


def test_malformed_select_calibration_is_refused(tiny_llama) -> None:
    with pytest.raises(ValueError, match="calibration"):
        libortho.decompose(copy.deepcopy(tiny_llama), _ids(4, 32, seed=0), CFG, progress=False,
                           select_calibration=torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        libortho.decompose(copy.deepcopy(tiny_llama), _ids(4, 32, seed=0), CFG, progress=False,
                           select_calibration=torch.zeros(0, 8, dtype=torch.long))


def test_phase_profile_accounts_for_the_wall_time(runs) -> None:
    """stats["phase_s"] says where the decomposition's time went: every phase present, none counted twice.

    Fails if a phase is dropped (the sum falls well short of the wall time), if the Hessian accumulation is
    left inside the forwards (the sum exceeds it), or if the call counts stop matching the schedule.
    """
    _, res = runs["sel"]
    phases, calls, wall = res.stats["phase_s"], res.stats["phase_calls"], res.stats["wall_s"]
    for p in ("capture", "stage_discovery", "stage_forward", "hessian_accumulate", "select_hessian_accumulate",
              "quantize", "select", "advance_forward"):
        assert phases[p] >= 0.0 and calls[p] >= 1, p
    assert "quantize_cholesky" in phases and phases["quantize_cholesky"] <= phases["quantize"]
    top = sum(v for k, v in phases.items() if k != "quantize_cholesky")  # cholesky is inside quantize
    assert 0.6 * wall <= top <= wall * 1.001
    n_layers = res.stats["layers"]
    assert calls["select"] == n_layers
    assert calls["quantize"] == 4 * res.stats["blocks"]  # q/k/v and gate/up each quantized as one stacked matrix
    assert calls["advance_forward"] == 2 * res.stats["blocks"]  # base and selector flows each advance per block
    assert calls["trim"] == res.stats["blocks"]  # the heap is given back once per block
