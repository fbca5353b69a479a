"""Data-parallel training: 2 CPU processes (gloo) give the weights of 1 process with the same global batch.

Every scenario trains the same tiny Llama (same seed) for a few optimizer steps, once in this
process without a process group (the reference) and once in each of two spawned processes
(``torch.distributed`` over gloo on a free localhost port, ``OMP_NUM_THREADS=1``), which take
their strided shares of every step's rows; rank 0 saves the weights.

Relative difference of a tensor: ``max|a - b| / max|b|`` (``b`` the 1-process tensor; a
scenario's is the largest over its tensors), required ``<= REL_TOL = 1e-5``. In float64 this
holds with many orders of magnitude to spare (the results agree to about 1e-14). In float32 the
element-wise figure is not a fair test of the data-parallel logic: AdamW divides each gradient
entry by its own running RMS, so an entry whose gradient is near zero turns float32 rounding of
the summation order into a visible change of its update. One process alone with other
micro-batches (same global batch) moves weights by ~1e-5 this way, two processes by ~2-5e-5.
The float32 runs are therefore held to the norm-based ``||a - b|| / ||b|| <= REL_TOL`` per
tensor (they reach ~1e-6), with the element-wise figure only bounded loosely (``FP32_MAX_REL``).

Scenarios: plain fine-tuning (``rule=None``); the routed ``mask`` method (public-token loss to
the shared weights, private-token loss to the memory: two parameter groups, each all-reduced and
clipped on its own) on private records (public text around a secret span) mixed with public
blocks; ``ogd`` and ``memsink``. Each uses gradient accumulation, an odd global batch (the ranks
hold 5 and 4 rows, micro-batches 3+2 and 3+1 against 3+3+3 in one process), warm-up and decay,
weight decay, and clipping that acts at every step; the steps give the ranks different numbers of
private tokens, one rank none while the other has some, and a public-only step. The negative
controls run the same 2-process training with the gradient all-reduce switched off (each rank
follows its own half of the data): they must differ from the reference by far more than
``REL_TOL``, so the comparison can fail.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from libortho.data.private import PrivateRecord, pack_private_records
from libortho.data.records import TokenRows
from libortho.models import ByteTokenizer, build_tiny_llama
from libortho.train import distributed
from libortho.train.loop import TrainConfig, batch_order, train
from libortho.train.rules import StepCounts
from libortho.train.separation import SEPARATION, SeparationConfig
from spawn import free_port, spawn

WORLD = 2
REL_TOL = 1e-5
FP32_MAX_REL = 2e-4  # element-wise bound in float32 (see above); the no-all-reduce controls reach > 1e-2
CONTROL_MIN = 1e-3  # a negative control must differ by at least 100x REL_TOL
MAX_GRAD_NORM = 0.005  # below the gradient norm of every group at every step: clipping always acts
ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
# batch_size * grad_accum = 9 rows per step: the ranks hold 5 and 4 rows
TRAIN = dict(lr=1e-3, steps=5, batch_size=3, grad_accum=3, warmup=0.2, schedule="cosine",
             max_grad_norm=MAX_GRAD_NORM, weight_decay=0.01, seed=0)
METHODS = {"plain": None, "mask": "mask", "ogd": "ogd", "memsink": "memsink"}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
SCENARIOS = {f"{m}-{d}": (method, dtype) for m, method in METHODS.items() for d, dtype in DTYPES.items()}
CONTROLS = {"plain-fp64-no-allreduce": "plain-fp64", "mask-fp64-no-allreduce": "mask-fp64",
            "mask-fp32-no-allreduce": "mask-fp32"}


def _data() -> TokenRows:
    """Public random blocks and packed private records (public text around a secret span), mixed."""
    tok = ByteTokenizer()
    records = [PrivateRecord(f"The code of person {i} is {1000 + 37 * i}. Good day to all.", str(1000 + 37 * i))
               for i in range(4)]
    private = pack_private_records(tok, records, 64, [1] * 4)
    gen = torch.Generator().manual_seed(1)
    public = TokenRows.from_blocks(torch.randint(0, 256, (16, 64), generator=gen), first_seq=10**9)
    return TokenRows.cat([public, private])


def _cfg() -> TrainConfig:
    return TrainConfig(**TRAIN)


def _run(method: str | None, dtype: torch.dtype
         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[float], int]:
    """Train a fresh model with ``method`` (None: plain) in ``dtype``: (initial, final) weights, losses, tokens."""
    data = _data()
    model = build_tiny_llama(seed=0, **ARCH).to(dtype)
    rule = None
    if method is not None:
        cfg = SeparationConfig(method=method, train=_cfg(), neurons=8, rank=4, support_neurons=8, probe_rows=4,
                               eta_every=2, memory_off_fraction=0.5, seed=0)
        rule = SEPARATION[method](cfg).attach(model, data, None)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    log = train(model, data, _cfg(), progress=False, rule=rule)
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return init, final, log.losses, log.tokens


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One of ``WORLD`` processes: every scenario, then the controls; rank 0 saves what it got."""
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                             timeout=timedelta(seconds=60))
    try:
        assert distributed.rank_and_world() == (rank, WORLD)
        for name, (method, dtype) in SCENARIOS.items():
            _, final, losses, tokens = _run(method, dtype)
            if rank == 0:
                torch.save({"weights": final, "losses": losses, "tokens": tokens}, Path(out_dir) / f"{name}.pt")
        _missing_gradients(rank, Path(out_dir))
        real = distributed.all_reduce_grads
        distributed.all_reduce_grads = lambda params: None  # each rank keeps its own half's gradients
        try:
            for name, scenario in CONTROLS.items():
                _, final, _, _ = _run(*SCENARIOS[scenario])
                if rank == 0:
                    torch.save({"weights": final}, Path(out_dir) / f"{name}.pt")
        finally:
            distributed.all_reduce_grads = real
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


def _missing_gradients(rank: int, out_dir: Path) -> None:
    """all_reduce_grads on three parameters: a gradient on both ranks, on rank 1 only, and on none."""
    both, one, none = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    both.grad = torch.full((3,), float(rank + 1))
    if rank == 1:
        one.grad = torch.tensor([1.0, 2.0, 3.0])
    distributed.all_reduce_grads([both, one, none])
    if rank == 0:
        torch.save({"both": both.grad, "one": one.grad, "none_is_none": torch.tensor(none.grad is None)},
                   out_dir / "missing-gradients.pt")


def _spawn(out_dir: Path, timeout_s: float = 240.0) -> None:
    """Run ``_worker`` in ``WORLD`` spawned processes (see tests/spawn.py)."""
    spawn(_worker, (free_port(), str(out_dir)), WORLD, timeout_s)


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest ``max|a - b| / max|b|`` over the tensors (``b`` the reference), and which tensor."""
    return _worst(a, b, lambda d, r: float(d.abs().max()) / max(float(r.abs().max()), 1e-30))


def norm_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest ``||a - b|| / ||b||`` over the tensors (``b`` the reference), and which tensor."""
    return _worst(a, b, lambda d, r: float(d.norm()) / max(float(r.norm()), 1e-30))


def _worst(a, b, rel) -> tuple[float, str]:
    assert a.keys() == b.keys()
    worst, where = 0.0, ""
    for k in b:
        if not b[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        d = rel(a[k].double() - b[k].double(), b[k].double())
        if d > worst:
            worst, where = d, k
    return worst, where


_WALL = pytest.StashKey[float]()


@pytest.fixture(scope="module")
def two_process(tmp_path_factory, request):
    """What the 2-process runs saved, by scenario name (one spawn runs every scenario: one start-up)."""
    if not (tdist.is_available() and tdist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # read by the spawned interpreters at start-up
        mp.setenv("HF_HUB_OFFLINE", "1")
        t0 = time.perf_counter()
        _spawn(out)
        request.config.stash[_WALL] = time.perf_counter() - t0
    return {p.stem: torch.load(p, weights_only=True) for p in out.glob("*.pt")}


@pytest.fixture(scope="module")
def one_process():
    """The same scenarios in this process, without a process group, with every clipping norm recorded."""
    assert not distributed.is_distributed()
    norms: list[float] = []
    real = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *a, **kw):
        total = real(params, max_norm, *a, **kw)
        norms.append(float(total))
        return total

    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.utils, "clip_grad_norm_", recording)
            for name, (method, dtype) in SCENARIOS.items():
                norms.clear()
                init, final, losses, tokens = _run(method, dtype)
                out[name] = {"init": init, "weights": final, "losses": losses, "tokens": tokens,
                             "norms": list(norms)}
    finally:
        torch.set_num_threads(threads)
    return out


def test_split_exercises_uneven_private_shares():
    """The global batches give the ranks different numbers of private tokens (once none at all on one
    rank), and a public-only step: both routed losses, both groups' all-reduces and idle groups occur."""
    data, cfg = _data(), _cfg()
    assert data.private_tokens > 0
    order = batch_order(len(data), cfg.steps, cfg.batch_size * cfg.grad_accum, cfg.seed)
    shares = []
    for idx in order:
        counts = StepCounts.of(data.subset(idx))
        per_rank = [StepCounts.of(data.subset(idx[r::WORLD])).private for r in range(WORLD)]
        assert sum(per_rank) == counts.private
        assert counts.public > 0
        shares.append(tuple(per_rank))
    assert any(a != b and min(a, b) > 0 for a, b in shares)  # both ranks private, unequal
    assert any(min(a, b) == 0 < max(a, b) for a, b in shares)  # one rank's memory gradients are None
    assert any(a == b == 0 for a, b in shares)  # public-only: the memory group idles (mask: may switch off)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_match_one(name, two_process, one_process):
    ref, got = one_process[name], two_process[name]
    # the training did something, and clipping acted on every group at every step
    moved, _ = max_rel(ref["weights"], ref["init"])
    assert moved > 1e-2, f"{name}: training barely moved the weights ({moved:.2e})"
    n_groups = 1 if name.startswith("plain") else 2
    assert len(ref["norms"]) >= TRAIN["steps"] * n_groups - 1, ref["norms"]  # mask/ogd: one idle memory step
    assert min(ref["norms"]) > MAX_GRAD_NORM, ref["norms"]
    # the same weights, losses and token counts
    rel, where = max_rel(got["weights"], ref["weights"])
    nrel, nwhere = norm_rel(got["weights"], ref["weights"])
    print(f"\n{name}: 1 vs 2 processes: max|a-b|/max|b| {rel:.2e} ({where}), ||a-b||/||b|| {nrel:.2e} ({nwhere})")
    assert nrel <= REL_TOL, f"{name}: 2 processes differ from 1 by {nrel:.2e} (norm) in {nwhere}"
    if ref["weights"][where].dtype == torch.float64:
        assert rel <= REL_TOL, f"{name}: 2 processes differ from 1 by {rel:.2e} in {where}"
    else:
        assert rel <= FP32_MAX_REL, f"{name}: 2 processes differ from 1 by {rel:.2e} in {where}"
    assert got["tokens"] == ref["tokens"]
    assert torch.allclose(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=REL_TOL, atol=0)


def test_missing_gradients_sum_as_zeros_but_stay_none_when_missing_everywhere(two_process):
    """A gradient missing on one rank counts as zeros; missing on every rank it stays None, as in one
    process, so AdamW skips the parameter instead of decaying it."""
    got = two_process["missing-gradients"]
    torch.testing.assert_close(got["both"], torch.full((3,), 3.0))
    torch.testing.assert_close(got["one"], torch.tensor([1.0, 2.0, 3.0]))
    assert bool(got["none_is_none"])


@pytest.mark.parametrize("name", list(CONTROLS))
def test_comparison_is_sensitive(name, two_process, one_process, request):
    """Without the gradient all-reduce, 2 processes are far from 1: the comparisons above can fail."""
    ref = one_process[CONTROLS[name]]["weights"]
    rel, where = max_rel(two_process[name]["weights"], ref)
    nrel, nwhere = norm_rel(two_process[name]["weights"], ref)
    print(f"\n{name}: max|a-b|/max|b| {rel:.2e} ({where}), ||a-b||/||b|| {nrel:.2e} ({nwhere}); "
          f"spawn wall {request.config.stash.get(_WALL, float('nan')):.1f} s")
    assert rel > CONTROL_MIN and nrel > CONTROL_MIN, f"{name}: the negative control differs by only {rel:.2e}"
