"""External baselines run on a tiny Llama, touch only block linears, and stay close to FP."""

import copy
import importlib
import os

import pytest
import torch

from libortho.eval.baselines import BASELINES


@pytest.mark.parametrize("name", ["hqq", "quanto"])
def test_baseline_quantizes_block_linears_only(name, tiny_llama) -> None:
    module = {"hqq": "hqq", "quanto": "optimum.quanto"}[name]
    if os.environ.get("LIBORTHO_REQUIRE_ASSETS") == "1":  # make test: requirements.lock pins both peers
        importlib.import_module(module)
    else:
        pytest.importorskip(module)
    fp = tiny_llama
    model = copy.deepcopy(fp)
    info = BASELINES[name](model, bits=4, group_size=32)
    assert info["group_size"] == 32 and 4 < info["bits_per_param"] < 6 and info["time_s"] >= 0
    assert type(model.model.layers[0].mlp.down_proj) is not torch.nn.Linear
    assert type(model.lm_head) is torch.nn.Linear and torch.equal(model.lm_head.weight, fp.lm_head.weight)
    ids = torch.randint(0, fp.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = fp(ids).logits, model(ids).logits.float()
    assert torch.isfinite(out).all()
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.2, rel
