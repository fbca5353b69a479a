"""Stages of the separation experiment that test the methods against what a reviewer asks first.

The unlearning baselines (GA/GD/NPO, each swept over a learning-rate x steps grid, tuned by a rule
fixed in :func:`libortho.experiments.separation_summary.pick_tuned`, and re-measured after INT4), the
relearning attack on an alpha = 0 model, memsink's per-record deletion, and seed 000's entanglement
eta of every update. Each takes the :class:`~libortho.experiments.separation.SeedRun` whose caches it
uses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from libortho.assemble import dequantized, dual_stream, quantized
from libortho.atomic import atomic_write_json
from libortho.data.records import TokenRows, pad_rows, record_ids
from libortho.eval.harness import PrivacyHarness
from libortho.experiments.separation_config import quant_key
from libortho.experiments.separation_summary import pick_tuned
from libortho.experiments.store import _canonical
from libortho.train.loop import TrainConfig, train
from libortho.train.separation import SEPARATION
from libortho.train.unlearn import UnlearnConfig, UnlearnTask, run_unlearning

if TYPE_CHECKING:  # pragma: no cover
    from libortho.experiments.separation import Lazy, SeedRun


def unlearning_stage(run: SeedRun, ft: Callable[[], nn.Module]) -> None:
    """Each baseline swept over the grid (quick evaluation), the tuned setting measured fully, FP and INT4.
    ``ft`` gives the FP fine-tuned model (called only when an evaluation is not recorded)."""
    d = run.data
    forget = pad_rows(record_ids(run.harness.tok, [r.text for r in d.records]), run.harness.pad)
    task = UnlearnTask(forget=forget, retain=d.public)
    for name in run.cfg.unlearning:
        _one_baseline(run, name, ft, task)


def _one_baseline(run: SeedRun, name: str, ft: Callable[[], nn.Module], task: UnlearnTask) -> None:
    cfg, sweep = run.cfg, run.cfg.unlearn_sweep

    def ucfg(lr: float, steps: int) -> UnlearnConfig:
        return UnlearnConfig(steps=steps, lr=lr, batch_size=sweep.batch_size,
                             retain_batch_size=sweep.retain_batch_size, seed=run.seed)

    def unlearned(u: UnlearnConfig) -> nn.Module:
        return run_unlearning(name, copy.deepcopy(ft()), task, u, progress=False).model

    entries = {}
    for lr in sweep.lrs:
        for steps in sweep.steps:
            u = ucfg(lr, steps)
            tag = f"{name}_lr{lr:g}_s{steps}"
            entries[tag] = run.evaluate(f"sweep_{tag}", f"{name} lr={lr:g} steps={steps}", "unlearning_sweep",
                                        lambda u=u: unlearned(u), {**run.base_key, "u": name, "cfg": u.__dict__},
                                        exposure=False, unlearning=name, lr=lr, steps=steps)
    best = pick_tuned(entries, run.evals["ft_fp"])
    u = ucfg(entries[best]["lr"], entries[best]["steps"])
    made: dict[str, nn.Module] = {}

    def tuned() -> nn.Module:
        if "m" not in made:
            made["m"] = unlearned(u)
        return made["m"]

    key = {**run.base_key, "u": name, "cfg": u.__dict__}
    run.evaluate(f"{name}_fp", f"{name} (tuned: lr={u.lr:g}, {u.steps} steps)", "unlearning", tuned, key,
                 unlearning=name, tuned=best)
    run.evaluate(f"{name}_int4", f"{name} (tuned) + INT4", "unlearning",
                 lambda: quantized(tuned(), run.data.calibration, cfg.quant)[0], {**key, **run.quant_key},
                 unlearning=name, tuned=best)


def relearn_stage(run: SeedRun, target: str, model_q: Callable[[], nn.Module]) -> None:
    """The relearning attack on an alpha = 0 model: ``relearn_steps`` steps at the fine-tuning learning rate,
    on public text alone and on public text + the first half of the member records; extraction and
    exposure are measured on the *other* half (a harness over those members only)."""
    cfg, d = run.cfg, run.data
    half = len(d.members) // 2
    held = PrivacyHarness(run.harness.tok, d.members[half:], d.nonmembers, d.domain_eval, d.general_eval,
                           replace(cfg.harness, exposure_nonmembers=False))
    held.ref_members, held.ref_nonmembers = None, None
    known = d.member_records(list(range(half)))
    attack_cfg = TrainConfig(lr=cfg.finetune.lr, steps=cfg.relearn_steps, batch_size=cfg.finetune.batch_size,
                             warmup=0.0, schedule="constant", bf16=cfg.finetune.bf16, seed=run.seed)
    for data_name, rows in (("public", d.public), ("public+half", TokenRows.cat([d.public, known]))):
        def build(rows: TokenRows = rows) -> nn.Module:
            model = dequantized(model_q())
            train(model, rows, attack_cfg, progress=False, desc="relearn")
            return model.eval()
        run.evaluate(f"relearn_{target}_{data_name}", f"{target} alpha=0 relearned on {data_name}", "relearn",
                     build, relearn_key(run, target, data_name, attack_cfg),
                     harness=held, target=target, attack_data=data_name, members_evaluated=len(d.members) - half)


def relearn_key(run: SeedRun, target: str, data_name: str, attack_cfg: TrainConfig) -> dict[str, Any]:
    """Cache key of one relearning evaluation: everything the attacked model depends on (the target's
    method config or reference name, the quantization, the attack)."""
    cfg = run.cfg
    model = ({"method": cfg.method_config(target, run.seed).key_dict(), "revision": SEPARATION[target].revision}
             if target in SEPARATION.names() else {"reference": target})
    return {**run.base_key, "target": target, "data": data_name, "attack": attack_cfg.__dict__, "model": model,
            **quant_key(cfg)}


def deletion_stage(run: SeedRun) -> None:
    """memsink: drop the sinks of the first ``delete_records`` members; measure deleted vs kept members."""
    from libortho.streams import NeuronMemory
    from libortho.train.methods.memsink import sink_neurons_of

    cfg = run.cfg
    scfg = cfg.method_config("memsink", run.seed)
    trained = run.method("memsink")
    drop = torch.zeros(scfg.neurons, dtype=torch.bool)
    for r in run.data.records[:cfg.delete_records]:
        drop[sink_neurons_of(r.seq_id, scfg.neurons, scfg.sink_fraction, scfg.seed)] = True
    # collateral: the share of each kept member's own sinks that the deletion also drops
    kept_ids = [c.seq_id for c in run.data.records[cfg.delete_records:]]
    lost = [float(drop[sink_neurons_of(i, scfg.neurons, scfg.sink_fraction, scfg.seed)].float().mean())
            for i in kept_ids]
    overlap = {"records_deleted": cfg.delete_records, "sinks_dropped": int(drop.sum()), "sinks": scfg.neurons,
               "kept_members_sinks_lost_mean": sum(lost) / max(1, len(lost))}
    if bool(drop.all()):
        # every sink serves some deleted record: per-record deletion cannot keep anything here, and the
        # "deleted" model is the alpha = 0 model already measured (memsink_int4_a0)
        run.stages["deletion"] = {**overlap, "evaluated": False,
                                  "why": f"the {cfg.delete_records} deleted records' sinks cover all {scfg.neurons} "
                                         f"sinks (each sequence uses {scfg.sink_fraction:g} of them): deleting them "
                                         "is switching the memory off, the alpha = 0 row"}
        run.say(f"memsink deletion: {run.stages['deletion']['why']}; not evaluated again")
        run.record()
        return

    def build() -> nn.Module:
        shared, streams = trained()
        keep, kept = ~drop, {}
        for name, s in streams.items():
            kept[name] = NeuronMemory(s.gate[keep].contiguous(), s.up[keep].contiguous(),
                                      s.down[:, keep].contiguous(), s.activation) if isinstance(s, NeuronMemory) else s
        return dual_stream(shared, kept, run.data.calibration, cfg.quant, alpha=1.0)[0]
    run.evaluate("memsink_delete_int4_a1", f"memsink, {cfg.delete_records} records' sinks deleted, alpha=1",
                 "deletion", build, {**run.base_key, "m": "memsink-delete", "n": cfg.delete_records,
                                     "method": scfg.key_dict(), "revision": SEPARATION["memsink"].revision,
                                     **run.quant_key},
                 deleted=list(range(cfg.delete_records)), sinks_dropped=int(drop.sum()), sinks=scfg.neurons,
                 kept_members_sinks_lost_mean=overlap["kept_members_sinks_lost_mean"])
    run.stages["deletion"] = {**overlap, "evaluated": True}


def eta_stage(run: SeedRun, models: dict[str, Lazy], available_only: bool = False) -> None:
    """Seed 000's entanglement eta of every update, on one held-out public subspace.

    Each model's eta is recorded on its own (``stages/eta/<model>.json``, under the model's cache key), so
    that a run records it while the model is at hand and a recorded eta never needs its model again (a
    cache lost between sessions then costs no retraining for it). Models already in memory or in the cache
    go first; ``available_only`` stops there (called after each stage that made models).

    The subspace of each block linear's inputs comes from the *pre-fine-tuning* model on the held-out
    domain blocks (never trained on) at the OGD energy threshold; eta is pooled over layers
    (``sqrt(sum ||dW P||^2 / sum ||dW||^2)``) with the random baseline ``sqrt(k/d)`` pooled alike.
    Plain fine-tuning's update is ``W_ft - W_pre``; a method's is its memory (neurons: their input rows).
    """
    handles: dict[str, Lazy] = {**models, **{m: run.method(m) for m in run.cfg.methods}}
    order = sorted(handles, key=lambda t: not handles[t].available)  # stable: at-hand models first
    for tag in order:
        eta_of(run, tag, handles[tag], tag in run.cfg.methods, available_only)


def eta_of(run: SeedRun, tag: str, handle: Lazy, is_method: bool, available_only: bool = False) -> None:
    """One model's eta into ``run.stages["eta"][tag]``: recorded, else measured (unless ``available_only``
    and making the model would train it) and recorded. A model made here only is released again."""
    etas = run.stages.setdefault("eta", {})
    cfg = run.cfg
    # the held-out subspace: the pre-fine-tuning model's inputs on the domain evaluation blocks at this energy
    key = _canonical({**run.base_key, "stage": "eta", "energy": cfg.separation.ogd_energy,
                      "heldout": [cfg.eval_blocks, cfg.eval_len], "of": handle.key})
    path = run.work / "stages" / "eta" / f"{tag}.json"
    saved = run.recorded(path, key, "recorded eta")
    if saved is not None:
        etas[tag] = saved
        return
    if available_only and not handle.available:
        return
    was_made = handle.made
    etas[tag] = _eta_of_update(run, is_method, handle)
    if not was_made:
        handle.release()
    atomic_write_json(path, {"key": key, "info": etas[tag]})
    run.record()


@torch.no_grad()
def _eta_bases(run: SeedRun) -> dict[str, torch.Tensor]:
    """Each block linear's held-out public input subspace (computed once per run)."""
    from libortho.geometry import energy_basis
    from libortho.models.layers import block_linear_names
    from libortho.train.methods.ogd import input_moments

    if run.eta_bases is None:
        pre = run.load_pre()
        names = block_linear_names(pre)
        run.eta_bases = {n: energy_basis(C, run.cfg.separation.ogd_energy).float()
                         for n, C in input_moments(pre, run.data.domain_eval, names).items()}
    return run.eta_bases


def _eta_of_update(run: SeedRun, is_method: bool, handle: Lazy) -> dict[str, float]:
    """Pooled eta of one model's update: ``W - W_pre`` of a plain model, the memory of a method's.

    The model is made first, with gradients enabled: making it may mean training it (a lost cache)."""
    made = handle()
    with torch.no_grad():
        return _pooled_eta(run, is_method, made)


def _pooled_eta(run: SeedRun, is_method: bool, made: Any) -> dict[str, float]:
    from libortho.geometry.subspace import eta_report
    from libortho.streams import NeuronMemory

    bases = _eta_bases(run)
    ups: dict[str, torch.Tensor] = {}
    if is_method:
        for n, st in made[1].items():
            if isinstance(st, NeuronMemory):
                ups[f"{n}.up_proj"] = torch.cat([st.gate.float(), st.up.float()])
            else:
                ups[n] = st.to_dense(torch.float32)
    else:
        model, pre = made, run.load_pre()
        ups = {n: model.get_submodule(n).weight.float() - pre.get_submodule(n).weight.float() for n in bases}
    rep = eta_report(ups, bases)
    return {"eta": rep["eta"], "random_baseline": rep["random_baseline"]}
