"""K-FAC factors over 2 data-parallel CPU workers (gloo) equal one process's: A and G bit for bit.

Each worker takes every second calibration batch; the factors' fp64 sums of per-batch products
are all-reduced, exactly as the GPTQ Hessian is (one :class:`MomentSum` reduction). EK-FAC's
eigenvalues are sums of squares in the shared eigenbasis and agree to rounding. Control: the same
workers with ``distributed=False`` each see half the data, and their factors differ.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from libortho.curvature import fit_kfac
from libortho.models import build_tiny_llama
from libortho.models.layers import find_linears
from spawn import gloo_runs

WORLD = 2


def _batches() -> list[torch.Tensor]:
    return list(torch.randint(0, 259, (10, 12), generator=torch.Generator().manual_seed(3)).split(2))


def _fit(batches: list[torch.Tensor], distributed: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    model = build_tiny_llama(seed=0)
    layers = dict(list(find_linears(model, ("lm_head",)).items())[:4])
    f = fit_kfac(model, batches, layers, fisher="empirical", ekfac=True, distributed=distributed)
    return {n: {"A": v.A, "G": v.G, "ekfac": v.ekfac, "counts": torch.tensor([v.n_tokens, v.n_examples])}
            for n, v in f.items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                             timeout=timedelta(seconds=60))
    try:
        mine = _batches()[rank::WORLD]
        torch.save({"shared": _fit(mine), "control": _fit(mine, distributed=False)},
                   Path(out_dir) / f"rank{rank}.pt")
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return gloo_runs(_worker, lambda: _fit(_batches()), tmp_path_factory.mktemp("ddp_kfac"), WORLD)


def test_two_workers_get_the_one_process_factors(runs) -> None:
    ref, ranks = runs
    for rank in ranks:
        for name, want in ref.items():
            got = rank["shared"][name]
            assert torch.equal(got["A"], want["A"]) and torch.equal(got["G"], want["G"]), name
            assert torch.equal(got["counts"], want["counts"]), name
            assert torch.allclose(got["ekfac"], want["ekfac"], rtol=1e-5, atol=1e-12), name


def test_without_the_all_reduce_each_worker_sees_half_the_data(runs) -> None:
    ref, ranks = runs
    for rank in ranks:
        for name, want in ref.items():
            got = rank["control"][name]
            assert not torch.allclose(got["A"], want["A"]) and got["counts"][1] < want["counts"][1], name
