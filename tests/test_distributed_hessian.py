"""Data-parallel calibration: 2 CPU processes (gloo) give the Hessians and base stream of 1 process, bit for bit.

Each worker takes every second calibration batch (``shard_batches``), runs its own activations
through the blocks already decomposed, and all-reduces the fp64 Hessian sums of every stage. The
per-batch products are computed exactly as in one process, and fp64 sums of them do not depend
on the order, so the Hessians and therefore GPTQ's codes must be *identical*, not merely close.
The negative control runs the same 2 workers with the all-reduce switched off: each then
quantizes against half the data, and its Hessians must differ.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

import libortho
from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
from libortho.curvature.hessian import HessianAccumulator
from libortho.models import build_tiny_llama
from spawn import gloo_runs

WORLD = 2
CFG = DecomposeConfig(quant=QuantConfig(method="gptq", bits=4, group_size=32),
                      select=SelectConfig(selector="obs", rho=0.02), batch_size=2)


def _calib() -> torch.Tensor:
    return torch.randint(0, 259, (10, 24), generator=torch.Generator().manual_seed(7))  # 5 batches: 3 + 2


def _decompose() -> dict[str, dict[str, torch.Tensor]]:
    res = libortho.decompose(build_tiny_llama(seed=0), _calib(), CFG, progress=False, keep_records=True)
    return {n: {"H": r.hessian, "packed": res.base[n].packed, "scales": res.base[n].scales, "zeros": res.base[n].zeros,
                "ortho": res.ortho[n].to_dense()} for n, r in res.records.items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                             timeout=timedelta(seconds=60))
    try:
        got = _decompose()
        real = HessianAccumulator.all_reduce
        HessianAccumulator.all_reduce = lambda self: self  # control: each worker keeps its half
        try:
            control = _decompose()
        finally:
            HessianAccumulator.all_reduce = real
        torch.save({"shared": got, "control": control}, Path(out_dir) / f"rank{rank}.pt")
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return gloo_runs(_worker, _decompose, tmp_path_factory.mktemp("ddp_hessian"), WORLD)


def test_two_workers_get_the_one_process_hessians_and_base_bit_for_bit(runs) -> None:
    ref, ranks = runs
    assert len(ref) == 14
    for rank in ranks:
        got = rank["shared"]
        assert got.keys() == ref.keys()
        for name, want in ref.items():
            for key, tensor in want.items():
                assert torch.equal(got[name][key], tensor), (name, key)


def test_without_the_all_reduce_the_workers_differ(runs) -> None:
    """The control: a worker quantizing against its own half of the batches has other Hessians."""
    ref, ranks = runs
    for rank in ranks:
        first = next(iter(ref))
        assert not torch.allclose(rank["control"][first]["H"], ref[first]["H"], rtol=1e-3, atol=0)
