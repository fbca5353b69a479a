"""torchao as an INT4 peer on SmolLM2-135M, on the perplexity table's protocol, from its own environment.

transformers imports torchao whenever it is installed, so torchao stays out of the main environment
(``.venv``) and runs from ``.venv-peers`` (``make peers-venv``: the main lock plus ``torchao``). This
script uses libortho only for what fixes the protocol (model loader, evaluation blocks, perplexity), so
its rows sit beside ``bench/ppl_table.py``'s: the same held-out blocks (fortunes, seed 1, 32 x 512), the
same FP32 model, weight-only INT4 at group size 64 on every decoder-block linear (never embeddings or
``lm_head``). The FP32 row is measured again here; :func:`main` records how far it is from the table's.

Methods (each row is written as soon as it is measured; a finished row is kept unless ``--fresh``):

- ``torchao-rtn``: ``IntxWeightOnlyConfig(int4, PerGroup(64), ASYMMETRIC)`` through ``quantize_``,
  torchao's CPU weight-only INT4 (min-max affine grid, round to nearest), run in fp32 as torchao runs it;
- ``torchao-rtn-hqq``: the same with ``intx_choose_qparams_algorithm=HQQ_SCALE_ONLY`` (torchao's HQQ
  scale search, symmetric);
- ``torchao-int4``: ``Int4WeightOnlyConfig(group_size=64)`` (the tinygemm/mslk path) and
  ``torchao-gptq``: ``GPTQConfig(base_config=Int4WeightOnlyConfig(64))``. Where a method cannot run on
  this machine its row records the error instead (torchao 0.18's int4 tensor and its GPTQ need the
  ``mslk`` kernels, whose PyPI release is an empty 0.0.0 placeholder, or CUDA).

Bits per parameter count the codes plus the scale and zero point at the dtype torchao stores them in.

    .venv-peers/bin/python bench/peers_torchao.py
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from libortho.atomic import atomic_write_json  # noqa: E402
from ppl_table import eval_blocks, measure  # noqa: E402
from provenance import git_state  # noqa: E402

OUT = Path("docs/results/performance_smollm2/peers_torchao.json")
TABLE = Path("docs/results/performance_smollm2/ppl_table.json")


def block_linear_filter(model: torch.nn.Module) -> Callable[[torch.nn.Module, str], bool]:
    """``quantize_``'s filter: exactly the decoder-block linears libortho and the other peers quantize."""
    from libortho.models.layers import find_linears

    names = set(find_linears(model, ("lm_head",)))
    return lambda mod, fqn: fqn in names


def _bits(model: torch.nn.Module, names: set[str]) -> dict[str, Any]:
    """Codes (4 bits) plus each group's scale and zero point at their stored dtype; which layers stayed dense.

    ``stored_bits_per_param`` counts the codes as torchao holds them in memory (``qdata``'s element size:
    the CPU IntxWeightOnly path keeps each 4-bit code in an int8).
    """
    total = stored = params = 0
    dense: list[str] = []
    meta: set[str] = set()
    for name, mod in model.named_modules():
        if name not in names:
            continue
        w = mod.weight
        n = w.shape[0] * w.shape[1]
        params += n
        scale, zero = getattr(w, "scale", None), getattr(w, "zero_point", None)
        if scale is None:  # left in high precision (torchao skips shapes it cannot group)
            dense.append(name)
            total += n * w.element_size() * 8
            stored += n * w.element_size() * 8
            continue
        groups = scale.numel()
        zbits = zero.element_size() * 8 if zero is not None else 0
        meta_bits = groups * (scale.element_size() * 8 + zbits)
        total += n * 4 + meta_bits
        qdata = getattr(w, "qdata", None)
        stored += (qdata.numel() * qdata.element_size() * 8 if qdata is not None else n * 4) + meta_bits
        meta.add(f"scale {scale.dtype}, zero {zero.dtype if zero is not None else 'none'}")
    return {"bits_per_param": total / params, "stored_bits_per_param": stored / params, "bits_meta": sorted(meta),
            "dense_layers": dense}


def _intx(hqq: bool) -> Any:
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    if not hqq:
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64),
                                    mapping_type=MappingType.ASYMMETRIC)
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64),
                                mapping_type=MappingType.SYMMETRIC,
                                intx_choose_qparams_algorithm=IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY)


def quantize_rtn(model: torch.nn.Module, calib: torch.Tensor | None, hqq: bool = False) -> None:
    from torchao.quantization import quantize_

    quantize_(model, _intx(hqq), filter_fn=block_linear_filter(model))


def quantize_int4(model: torch.nn.Module, calib: torch.Tensor | None) -> None:
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    quantize_(model, Int4WeightOnlyConfig(group_size=64), filter_fn=block_linear_filter(model))


def quantize_gptq(model: torch.nn.Module, calib: torch.Tensor | None) -> None:
    from torchao.prototype.gptq import GPTQConfig
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    keep = block_linear_filter(model)
    base = Int4WeightOnlyConfig(group_size=64)
    quantize_(model, GPTQConfig(step="observe", base_config=base), filter_fn=keep)
    with torch.no_grad():
        for b in range(0, calib.shape[0], 4):
            model(calib[b:b + 4])
    quantize_(model, GPTQConfig(step="convert", base_config=base), filter_fn=keep)


METHODS: dict[str, tuple[str, Callable[..., None], bool]] = {
    "torchao-rtn": ("torchao IntxWeightOnly int4 g64 (affine RTN)", quantize_rtn, False),
    "torchao-rtn-hqq": ("torchao IntxWeightOnly int4 g64 (HQQ scale-only)",
                        lambda m, c: quantize_rtn(m, c, hqq=True), False),
    "torchao-int4": ("torchao Int4WeightOnly g64", quantize_int4, False),
    "torchao-gptq": ("torchao GPTQ int4 g64", quantize_gptq, True),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="tests use the tiny model")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--table", type=Path, default=TABLE, help="ppl_table.json whose protocol to follow")
    ap.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--n-eval", type=int, default=None, help="default: the table's")
    args = ap.parse_args(argv)
    try:
        import torchao
    except ImportError as err:
        raise SystemExit(f"torchao is not importable here ({err}); run `make peers-venv` and use "
                         ".venv-peers/bin/python") from err
    table = json.loads(args.table.read_text()) if args.table.exists() else None
    if table is None and args.model == "smollm2-135m":
        raise SystemExit(f"{args.table} is missing: its protocol (blocks, corpus) is the one to follow")
    proto = dict((table or {}).get("args", {}))
    ns = argparse.Namespace(eval_corpus=proto.get("eval_corpus", "fortunes"),
                            n_eval=args.n_eval or proto.get("n_eval", 32), seq_len=proto.get("seq_len", 512),
                            calib=proto.get("calib", ["shakespeare"]), n_calib=proto.get("n_calib", 128))
    state = json.loads(args.out.read_text()) if args.out.exists() and not args.fresh else {}
    state.update({"benchmark": "peers_torchao", "torchao": torchao.__version__, "torch": torch.__version__,
                  "protocol": vars(ns), "machine": {"cpu": platform.processor() or platform.machine(),
                                                    "threads": torch.get_num_threads()}})
    state.setdefault("git", []).append(git_state())
    from libortho.data import calibration_blocks
    from libortho.models import load_model
    from libortho.models.layers import find_linears

    torch.manual_seed(0)
    fp, tok = load_model(args.model)
    evals = eval_blocks(tok, ns)
    rows = state.setdefault("rows", {})
    if "fp32" not in rows:
        rows["fp32"] = {"method": "FP32 (this environment)", "ppl_measured": measure(fp, evals, "FP32")}
        atomic_write_json(args.out, {**state, "partial": True})
    if table and "fp32" in table.get("rows", {}):
        ref = table["rows"]["fp32"]["ppl_measured"]["ppl"]
        state["fp32_vs_table"] = {"table": ref, "here": rows["fp32"]["ppl_measured"]["ppl"],
                                  "rel_diff": rows["fp32"]["ppl_measured"]["ppl"] / ref - 1.0}
    calib = None
    for key in args.methods:
        if key in rows and "error" not in rows[key]:
            continue
        label, fn, needs_calib = METHODS[key]
        if needs_calib and calib is None:
            calib = calibration_blocks(ns.calib, tok, n_blocks=ns.n_calib, block_len=ns.seq_len, seed=0)
        m = copy.deepcopy(fp)
        names = set(find_linears(m, ("lm_head",)))
        t = time.perf_counter()
        try:
            fn(m, calib)
        except Exception as err:  # a peer that cannot run here is a row, not a crash
            rows[key] = {"method": label, "group_size": 64, "error": f"{type(err).__name__}: {err}"}
            print(f"  {label:<44} cannot run: {rows[key]['error']}", flush=True)
        else:
            dt = time.perf_counter() - t
            rows[key] = {"method": label, "group_size": 64, "quantize_s": dt, **_bits(m, names),
                         "ppl_measured": measure(m, evals, label)}
        atomic_write_json(args.out, {**state, "partial": True})
        del m
    state["partial"] = False
    atomic_write_json(args.out, state)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
