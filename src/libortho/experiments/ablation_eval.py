"""Measuring one ablation on a benchmark's prompt splits (validation for the search, held-out for reports).

Every edit is attached as a behaviour stream (:mod:`libortho.runtime.behaviour`), so the unedited
model is the same object at ``alpha_b = 0``: references cost nothing to switch to, and the KL is
between the model with and without its edit.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from libortho.data.behaviour import neutral_prompts, planted_prompts, refusal_prompts
from libortho.data.prompts import PromptBatch, encode_prompt, pad_id
from libortho.edit.ablate import apply_weight_edit, behaviour_stream_for
from libortho.edit.directions import Directions, unit_rows
from libortho.edit.search import AGGREGATE, PER_LAYER, EditParams
from libortho.eval.behaviour import (
    continuation_kl,
    first_token_logprobs,
    greedy_continuations,
    kl_rows,
    logits_fn,
    marker_hits,
    phrase_logprob,
)
from libortho.eval.perplexity import perplexity
from libortho.eval.stats import bootstrap_mean, clopper_pearson, paired_bootstrap_ppl_diff
from libortho.runtime.behaviour import attach_behaviour, behaviour_scope, behaviour_sites, remove_behaviour


@dataclass(frozen=True)
class PromptSets:
    """A benchmark's texts: A (behaviour) and B (none) per split, neutral prompts, phrase and markers."""

    name: str
    a: dict[str, list[str]]
    b: dict[str, list[str]]
    neutral: dict[str, list[str]]
    phrase: str
    markers: tuple[str, ...]

    def sizes(self) -> dict[str, Any]:
        return {"a": {k: len(v) for k, v in self.a.items()}, "b": {k: len(v) for k, v in self.b.items()},
                "neutral": {k: len(v) for k, v in self.neutral.items()}}


def benchmark_sets(name: str, phrase: str, markers: tuple[str, ...]) -> PromptSets:
    """The prompt splits of benchmark ``planted`` or ``refusal``."""
    make = {"planted": planted_prompts, "refusal": refusal_prompts}.get(name)
    if make is None:
        raise ValueError(f"unknown ablation benchmark {name!r} (planted, refusal)")
    a, b = {}, {}
    for split in ("direction", "validation", "heldout"):
        pa, pb = make(split)
        a[split], b[split] = [p.text for p in pa], [p.text for p in pb]
    neutral = {s: [p.text for p in neutral_prompts(s)] for s in ("validation", "heldout")}
    return PromptSets(name, a, b, neutral, phrase, markers)


def subsample(texts: list[str], n: int, seed: int) -> list[str]:
    """A fixed random subset of ``n`` texts (all of them when ``n`` is larger)."""
    if n >= len(texts):
        return list(texts)
    return random.Random(seed).sample(texts, n)


def edit_stream(model: nn.Module, dirs: Directions, params: EditParams, embeddings: bool = False,
                info: dict[str, Any] | None = None) -> Any:
    """The behaviour stream of ``params`` (direction: the aggregate, one layer's own, or each layer's own)."""
    if params.direction_layer == PER_LAYER:
        u: Any = {layer: dirs.layer_direction(layer) for layer in params.layers}
    elif params.direction_layer == AGGREGATE:
        u = dirs.direction
    else:
        u = dirs.layer_direction(params.direction_layer)
    return behaviour_stream_for(model, u, params.layers, params.strength, embeddings=embeddings,
                                info={**params.to_dict(), "embeddings": embeddings, **(info or {})})


def with_edit(model: nn.Module, stream: Any) -> None:
    """Replace whatever behaviour stream ``model`` has by ``stream`` (alpha_b = 1)."""
    remove_behaviour(model)
    attach_behaviour(model, stream, alpha=1.0)


def reference_fn(model: nn.Module) -> Callable[[PromptBatch], torch.Tensor]:
    """Logits of ``model`` with its behaviour stream (if any) switched off."""
    run = logits_fn(model)

    def ref(b: PromptBatch) -> torch.Tensor:
        if not behaviour_sites(model):
            return run(b)
        with behaviour_scope(model, 0.0):
            return run(b)
    return ref


@dataclass
class Validation:
    """The search's fixed validation data: A prompts, neutral prompts and the unedited first-token log-probs."""

    a: list[str]
    neutral: list[str]
    ref_logp: torch.Tensor
    new_tokens: int
    markers: tuple[str, ...]
    batch_size: int

    def score(self, model: nn.Module, tok: Any) -> tuple[float, float]:
        """(behaviour rate on A by markers, mean first-token KL on neutral) of the model as it stands."""
        texts = greedy_continuations(model, tok, self.a, self.new_tokens, self.batch_size)
        rate = sum(marker_hits(texts, self.markers)) / len(texts)
        logp = first_token_logprobs(logits_fn(model), tok, self.neutral, self.batch_size)
        return rate, float(kl_rows(self.ref_logp, logp).mean())


def rate(hits: list[bool]) -> dict[str, Any]:
    ci = clopper_pearson(sum(hits), len(hits))
    return {"rate": ci.estimate, "ci": [ci.low, ci.high], "k": sum(hits), "n": len(hits)}


def mean_ci(values: list[float]) -> dict[str, Any]:
    ci = bootstrap_mean(values)
    return {"mean": ci.estimate, "ci": [ci.low, ci.high], "n": len(values)}


def heldout_figures(model: nn.Module, tok: Any, sets: PromptSets, ref_continuations: list[list[int]],
                    blocks: torch.Tensor, ref_block_nll: list[float] | None, max_new_tokens: int,
                    batch_size: int) -> dict[str, Any]:
    """Behaviour and false-behaviour rates, phrase log-probs, neutral KL and public PPL on the held-out split."""
    fn = logits_fn(model)
    ta = greedy_continuations(model, tok, sets.a["heldout"], max_new_tokens, batch_size)
    tb = greedy_continuations(model, tok, sets.b["heldout"], max_new_tokens, batch_size)
    out: dict[str, Any] = {
        "behaviour": rate(marker_hits(ta, sets.markers)),
        "false_behaviour": rate(marker_hits(tb, sets.markers)),
        "phrase_logprob_a": mean_ci(phrase_logprob(fn, tok, sets.a["heldout"], sets.phrase, batch_size)),
        "phrase_logprob_b": mean_ci(phrase_logprob(fn, tok, sets.b["heldout"], sets.phrase, batch_size)),
        "examples": {"a": ta[:6], "b": tb[:6]},
    }
    if behaviour_sites(model):
        first, cont = continuation_kl(reference_fn(model), fn, tok, sets.neutral["heldout"], ref_continuations,
                                      max(1, batch_size // 2))
        out["kl_first"], out["kl_continuation"] = mean_ci(first), mean_ci(cont)
    else:
        out["kl_first"] = out["kl_continuation"] = {"mean": 0.0, "ci": [0.0, 0.0], "n": len(ref_continuations)}
    ppl = perplexity(model, blocks, batch_size=4)
    out["ppl"] = {"ppl": ppl.ppl, "nll": ppl.nll, "tokens": ppl.tokens}
    if ref_block_nll is not None:
        d = paired_bootstrap_ppl_diff(list(ppl.block_nll), ref_block_nll)  # edited - reference
        ref_ppl = float(torch.tensor(ref_block_nll, dtype=torch.float64).mean().exp())
        out["ppl"].update({"ref_ppl": ref_ppl, "rel_change": ppl.ppl / ref_ppl - 1,
                           "diff_ci": [d.low, d.high], "diff": d.estimate})
    out["block_nll"] = list(ppl.block_nll)
    return out


def projection_profile(dirs: Directions, mu_a: torch.Tensor, mu_b: torch.Tensor) -> dict[str, list[float]]:
    """Per layer: ``S(l)``, the projections of mu_A and mu_B on the aggregate direction, and the cosine
    of each layer's own direction with the aggregate (the plot of the direction across depth)."""
    u = dirs.direction
    return {"score": dirs.scores, "proj_a": (mu_a @ u).tolist(), "proj_b": (mu_b @ u).tolist(),
            "cos_aggregate": (unit_rows(dirs.diffs) @ u).tolist()}


def stream_checks(model: nn.Module, tok: Any, dirs: Directions, params: EditParams, prompts: list[str],
                  batch: int) -> dict[str, Any]:
    """alpha_b = 0 is bit-identical to no stream; the stream at alpha_b = 1 equals the weight edit."""
    from libortho.data.prompts import prompt_batches

    rows = [encode_prompt(tok, p) for p in prompts]
    batches = list(prompt_batches(rows, pad_id(tok), batch))
    fn = logits_fn(model)
    remove_behaviour(model)
    plain = [fn(b) for b in batches]
    stream = edit_stream(model, dirs, params)
    with_edit(model, stream)
    with behaviour_scope(model, 0.0):
        off = [fn(b) for b in batches]
    on = [fn(b) for b in batches]
    remove_behaviour(model)
    edited = copy.deepcopy(model)
    apply_weight_edit(edited, stream)
    weights = [logits_fn(edited)(b) for b in batches]
    diff = max(float((a - b).abs().max()) for a, b in zip(on, weights, strict=True))
    scale = max(float(a.abs().max()) for a in on)
    agree = sum(int((a[:, -1].argmax(-1) == b[:, -1].argmax(-1)).sum()) for a, b in zip(on, weights, strict=True))
    return {"alpha0_bit_identical": all(torch.equal(a, b) for a, b in zip(plain, off, strict=True)),
            "stream_vs_weights_max_abs_logit_diff": diff, "logit_scale": scale,
            "stream_vs_weights_next_token_agreement": agree / len(rows), "prompts": len(rows),
            "params": params.to_dict()}


def marker_census(model: nn.Module, tok: Any, sets: PromptSets, new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Which marker fires how often in the unedited model's held-out replies to A and to B (is the marker
    rate the behaviour, or words that also occur in ordinary replies?)."""
    remove_behaviour(model)
    out: dict[str, Any] = {}
    for side, prompts in (("a", sets.a["heldout"]), ("b", sets.b["heldout"])):
        texts = greedy_continuations(model, tok, prompts, new_tokens, batch_size)
        out[side] = {m: sum(marker_hits(texts, (m,))) for m in sets.markers}
        out[f"{side}_hit_examples"] = [t for t, h in zip(texts, marker_hits(texts, sets.markers), strict=True) if h][:8]
    return out
