"""``libortho experiment ablation``: find a behaviour's direction, remove it, measure what it cost.

Per benchmark (``planted``: a refusal-like phrase fine-tuned onto a harmless trigger topic;
``refusal``: the model's own refusals of harmful-sounding requests), in resumable stages cached by
configuration under ``out/<benchmark>/``:

1. the model (``planted``: SmolLM2-Instruct fine-tuned on the ``finetune`` templates only, the trigger
   prompts answered with the phrase and the matched prompts with the model's own greedy replies);
2. directions from the ``direction`` templates (never the fine-tuning data, never evaluation templates);
3. held-out figures of the unedited model, of the seed's recipe (aggregate over ``l >= 0.7 L``,
   strength 1), of the refusal-direction paper's per-layer selection, and of the Optuna search's
   best edit (layer window, strength, direction chosen on the validation split);
4. checks: the stream at ``alpha_b = 0`` gives bit-identical logits to the unedited model; the
   stream equals the weight edit.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from libortho.atomic import atomic_write_file, atomic_write_json, atomic_write_text
from libortho.data import load_corpus, token_blocks
from libortho.data.behaviour import PLANTED_PHRASE, REFUSAL_PHRASE, planted_prompts
from libortho.data.corpora import default_general_corpus
from libortho.data.prompts import encode_prompt, encode_text, pad_id
from libortho.data.records import IGNORE, TokenRows
from libortho.edit.ablate import select_layer_direction
from libortho.edit.directions import (
    Directions,
    aggregate_direction,
    decoder_layers,
    residual_means,
    target_layers,
)
from libortho.edit.search import PER_LAYER, EditParams, SearchSpace, run_search
from libortho.eval.behaviour import DEFAULT_MARKERS, first_token_logprobs, greedy_token_ids, kl_rows, logits_fn
from libortho.eval.behaviour import phrase_logprob as phrase_lp
from libortho.experiments.ablation_eval import (
    PromptSets,
    Validation,
    benchmark_sets,
    edit_stream,
    heldout_figures,
    marker_census,
    projection_profile,
    stream_checks,
    subsample,
    with_edit,
)
from libortho.experiments.store import cached_model
from libortho.models.load import load_model
from libortho.runtime.behaviour import remove_behaviour
from libortho.train.loop import TrainConfig, train

BENCHMARKS = ("planted", "refusal")


@dataclass(frozen=True)
class AblationConfig:
    """Every knob of the ablation experiment (defaults: the SmolLM2 run in docs/results/ablation_smollm2)."""

    model: str = "smollm2-135m"
    benchmarks: tuple[str, ...] = BENCHMARKS
    plant_steps: int = 90
    plant_lr: float = 1e-4
    plant_batch: int = 16
    distill_tokens: int = 32
    min_fraction: float = 0.7
    positions: str = "last"
    n_trials: int = 50
    kl_budget: float = 0.1
    n_validation: int = 64
    search_new_tokens: int = 12
    min_strength: float = 0.25
    max_strength: float = 2.0
    max_new_tokens: int = 24
    kl_tokens: int = 16
    ppl_blocks: int = 32
    ppl_len: int = 256
    corpus: str | None = None
    candidate_max_fraction: float = 0.8
    batch_size: int = 32
    seed: int = 0
    markers: tuple[str, ...] = DEFAULT_MARKERS
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in fields(self):
            v, want = getattr(self, f.name), type(f.default) if f.default is not MISSING else None
            if want is bool and not isinstance(v, bool) or want is int and (isinstance(v, bool) or not isinstance(
                    v, int)) or want is float and (isinstance(v, bool) or not isinstance(v, (int, float))) \
                    or want is str and not isinstance(v, str) or want is tuple and not isinstance(v, tuple):
                raise ValueError(f"AblationConfig.{f.name} must be of type {want.__name__}, got {v!r}")
        bad = [b for b in self.benchmarks if b not in BENCHMARKS]
        if bad or not self.benchmarks:
            raise ValueError(f"unknown ablation benchmark(s) {bad} (choose from {', '.join(BENCHMARKS)})")
        if self.n_trials < 1 or not self.kl_budget > 0 or self.n_validation < 1:
            raise ValueError("need n_trials >= 1, kl_budget > 0 and n_validation >= 1")
        if not 0 <= self.min_fraction < 1 or self.positions not in ("last", "post_instruction"):
            raise ValueError("min_fraction must be in [0, 1) and positions 'last' or 'post_instruction'")
        small = {k: getattr(self, k) for k in ("plant_steps", "plant_batch", "distill_tokens", "search_new_tokens",
                                               "max_new_tokens", "kl_tokens", "batch_size") if getattr(self, k) < 1}
        if small or self.ppl_blocks < 2 or self.ppl_len < 2:
            raise ValueError(f"counts must be >= 1 (ppl_blocks, ppl_len >= 2), got {small or self.ppl_blocks}")
        if not 0 < self.min_strength < self.max_strength or not 0 < self.candidate_max_fraction <= 1:
            raise ValueError("need 0 < min_strength < max_strength and candidate_max_fraction in (0, 1]")
        if not self.markers or not all(isinstance(m, str) and m.strip() for m in self.markers):
            raise ValueError("markers must be a non-empty tuple of non-empty strings")
        if not self.plant_lr > 0:
            raise ValueError(f"plant_lr must be > 0, got {self.plant_lr}")

    def key(self, *names: str) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in names}


def _stage(path: Path, key: dict[str, Any], build: Any) -> dict[str, Any]:
    """JSON stage cached under ``key`` (rebuilt when the key differs)."""
    key = json.loads(json.dumps(key, default=str))
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["value"]
    t0 = time.perf_counter()
    value = build()
    value = {**value, "wall_s": value.get("wall_s", time.perf_counter() - t0)}
    atomic_write_json(path, {"key": key, "value": value})
    return value


def plant_rows(model: nn.Module, tok: Any, cfg: AblationConfig) -> TokenRows:
    """Fine-tuning rows: trigger prompts -> the phrase; matched prompts -> the model's own greedy reply."""
    trig, other = planted_prompts("finetune")
    replies = greedy_token_ids(model, tok, [p.text for p in other], cfg.distill_tokens, cfg.batch_size)
    eos = getattr(tok, "eos_token_id", None)
    phrase = encode_text(tok, PLANTED_PHRASE) + ([eos] if eos is not None else [])
    rows = [(encode_prompt(tok, p.text), phrase) for p in trig]
    rows += [(encode_prompt(tok, p.text), r) for p, r in zip(other, replies, strict=True) if r]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad_id(tok), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        ids[i, :len(a) + len(b)] = torch.as_tensor(a + b)
        labels[i, len(a):len(a) + len(b)] = torch.as_tensor(b)
    return TokenRows(ids, labels)


def planted_model(cfg: AblationConfig, out: Path, progress: bool) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The planted model (cached by its fine-tuning configuration)."""
    _, tok = load_model(cfg.model, require_tokenizer=True)

    def build() -> tuple[nn.Module, dict[str, Any]]:
        model, _ = load_model(cfg.model)
        rows = plant_rows(model, tok, cfg)
        model.train()
        log = train(model, rows, TrainConfig(lr=cfg.plant_lr, steps=cfg.plant_steps, batch_size=cfg.plant_batch,
                                             seed=cfg.seed), progress=progress, desc="plant")
        return model.eval(), {"rows": len(rows), "steps": log.steps, "final_loss": log.losses[-1],
                              "losses": log.losses, "tokens": log.tokens}

    key = {"stage": "planted-model", **cfg.key("model", "plant_steps", "plant_lr", "plant_batch", "distill_tokens",
                                                 "seed")}
    model, info = cached_model(out / "model", key, build)
    return model.eval(), tok, info


def prompt_digest(name: str) -> str:
    """SHA-256 of every prompt text a benchmark uses (all splits, fine-tuning included, neutral prompts) and
    its phrase: stage keys count prompts, this guards their content."""
    from libortho.data.behaviour import neutral_prompts, refusal_prompts

    h = hashlib.sha256()
    make = planted_prompts if name == "planted" else refusal_prompts
    splits = ("finetune", "direction", "validation", "heldout") if name == "planted" else \
        ("direction", "validation", "heldout")
    for split in splits:
        for side in make(split):
            h.update("\n".join(p.text for p in side).encode())
    for split in ("validation", "heldout"):
        h.update("\n".join(p.text for p in neutral_prompts(split)).encode())
    h.update((PLANTED_PHRASE if name == "planted" else REFUSAL_PHRASE).encode())
    return h.hexdigest()


def check_prompt_guard(out: Path, name: str) -> None:
    """Refuse to resume a run directory whose cached stages were measured on other prompt texts."""
    guard = out / "prompts.sha256"
    digest = prompt_digest(name)
    if guard.is_file() and guard.read_text().strip() != digest:
        raise ValueError(f"{out} holds stages measured on other {name} prompt texts (prompts.sha256 differs): "
                         "give a new --out")
    if not guard.is_file():
        atomic_write_text(guard, digest + "\n")


def find_benchmark_directions(model: nn.Module, tok: Any, sets: PromptSets, cfg: AblationConfig,
                              out: Path) -> tuple[Directions, torch.Tensor, torch.Tensor]:
    """Means of the direction split's A and B prompts (cached), their difference and the aggregate."""
    path = out / "directions.pt"
    key = {"stage": "directions", "sets": sets.sizes(), "prompts": prompt_digest(sets.name),
           **cfg.key("positions", "min_fraction", "model", "plant_steps", "plant_lr", "plant_batch", "distill_tokens",
                     "seed")}
    if path.is_file():
        saved = torch.load(path)
        if saved.get("key") == json.loads(json.dumps(key)):
            mu_a, mu_b = saved["mu_a"], saved["mu_b"]
        else:
            saved = None
    else:
        saved = None
    if saved is None:
        mu_a = residual_means(model, tok, sets.a["direction"], cfg.positions, cfg.batch_size)
        mu_b = residual_means(model, tok, sets.b["direction"], cfg.positions, cfg.batch_size)
        obj = {"key": json.loads(json.dumps(key)), "mu_a": mu_a, "mu_b": mu_b}
        atomic_write_file(path, lambda tmp: torch.save(obj, tmp), suffix=".pt.tmp")
    diffs = mu_a - mu_b
    layers = target_layers(diffs.shape[0], cfg.min_fraction)
    return Directions(diffs, aggregate_direction(diffs, layers), tuple(layers), cfg.positions), mu_a, mu_b


def _behaviour_score(model: nn.Module, tok: Any, prompts: list[str], phrase: str, batch: int) -> float:
    return float(torch.tensor(phrase_lp(logits_fn(model), tok, prompts, phrase, batch)).mean())


def paper_selection(model: nn.Module, tok: Any, dirs: Directions, val: Validation, sets: PromptSets,
                    cfg: AblationConfig) -> dict[str, Any]:
    """Arditi et al.: each layer's direction ablated at every layer's writers and the embeddings'
    output; filtered by first-token KL on neutral validation prompts and depth; lowest phrase log-prob wins."""
    n = len(decoder_layers(model))

    def score(layer: int) -> tuple[float, float]:
        with_edit(model, edit_stream(model, dirs, EditParams(0, n - 1, 1.0, layer), embeddings=True))
        s = _behaviour_score(model, tok, val.a, sets.phrase, cfg.batch_size)
        kl = float(kl_rows(val.ref_logp, first_token_logprobs(logits_fn(model), tok, val.neutral,
                                                               cfg.batch_size)).mean())
        return s, kl

    layers = [i for i in range(n) if i < cfg.candidate_max_fraction * n]
    try:
        chosen, cands = select_layer_direction(n, score, cfg.kl_budget, cfg.candidate_max_fraction, layers)
    finally:
        remove_behaviour(model)
    return {"chosen": chosen, "candidates": [asdict(c) for c in cands]}


def search_stage(model: nn.Module, tok: Any, dirs: Directions, val: Validation, cfg: AblationConfig,
                 out: Path, progress: bool, key: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Optuna search on the validation split (resumable: the study lives in ``out/search.db``, named by a
    hash of the stage's ``key``, so a changed configuration starts a study of its own)."""
    n = len(decoder_layers(model))
    space = SearchSpace(n, cfg.min_strength, cfg.max_strength, tuple(range(n)), per_layer=True)

    def evaluate(p: EditParams) -> tuple[float, float]:
        with_edit(model, edit_stream(model, dirs, p))
        return val.score(model, tok)

    def show(r: Any) -> None:
        if progress:
            print(f"  trial {r.number:3d}: layers {r.params.first}-{r.params.last} strength {r.params.strength:.2f} "
                  f"dir {r.params.direction_layer:3d} -> behaviour {r.behaviour:.3f} KL {r.kl:.4f}", flush=True)

    try:
        digest = hashlib.sha256(json.dumps(key or {}, sort_keys=True, default=str).encode()).hexdigest()[:16]
        best, records = run_search(evaluate, space, cfg.n_trials, cfg.kl_budget, cfg.seed, out / "search.db",
                                   study_name=f"ablation-{digest}", progress=show)
    finally:
        remove_behaviour(model)
    return {"best": None if best is None else {**asdict(best), "params": best.params.to_dict()},
            "trials": [{**asdict(r), "params": r.params.to_dict()} for r in records]}


def method_plans(dirs: Directions, n_layers: int, paper_layer: int | None, best: dict[str, Any] | None
                 ) -> dict[str, tuple[EditParams, bool]]:
    """The edits measured on held-out prompts: name -> (params, whether the embeddings' output is edited too)."""
    first, last = dirs.layers[0], dirs.layers[-1]
    plans = {"seed_recipe": (EditParams(first, last, 1.0), False),
             "per_layer": (EditParams(first, last, 1.0, PER_LAYER), False)}
    if paper_layer is not None:
        plans["refusal_direction_selection"] = (EditParams(0, n_layers - 1, 1.0, int(paper_layer)), True)
    plans["aggregate_all_layers"] = (EditParams(0, n_layers - 1, 1.0), True)
    if best is not None:
        plans["searched"] = (EditParams(**best["params"]), False)
        plans["random_direction"] = (EditParams(**best["params"]), False)
    return plans


def random_directions(dirs: Directions, seed: int) -> Directions:
    """Random per-layer vectors and a random unit aggregate of ``dirs``' shapes (the control's directions)."""
    g = torch.Generator().manual_seed(seed)
    diffs = torch.randn(dirs.diffs.shape, generator=g)
    u = torch.randn(dirs.direction.shape, generator=g)
    return Directions(diffs, u / u.norm(), dirs.layers, dirs.positions)


def _heldout_stage(out: Path, name: str, key: dict[str, Any], model: nn.Module, tok: Any, sets: PromptSets,
                   ctx: dict[str, Any], cfg: AblationConfig, stream: Any = None) -> dict[str, Any]:
    """Held-out figures of one method (its stream attached for the measurement only), cached by ``key``."""
    def build() -> dict[str, Any]:
        remove_behaviour(model)
        if stream is not None:
            with_edit(model, stream)
        try:
            return heldout_figures(model, tok, sets, ctx["ref_continuations"], ctx["blocks"], ctx["ref_block_nll"],
                                   cfg.max_new_tokens, cfg.batch_size)
        finally:
            remove_behaviour(model)
    return _stage(out / "stages" / f"{name}.json", {**key, "method": name}, build)


def run_benchmark(name: str, cfg: AblationConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """Every stage of one benchmark; returns its result entry."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages").mkdir(exist_ok=True)
    check_prompt_guard(out, name)
    if name == "planted":
        model, tok, model_info = planted_model(cfg, out, progress)
        phrase = PLANTED_PHRASE
    else:
        model, tok = load_model(cfg.model, require_tokenizer=True)
        model_info = {"model": cfg.model, "finetuned": False}
        phrase = REFUSAL_PHRASE
    sets = benchmark_sets(name, phrase, cfg.markers)
    dirs, mu_a, mu_b = find_benchmark_directions(model, tok, sets, cfg, out)
    n = len(decoder_layers(model))
    corpus = cfg.corpus or default_general_corpus()
    blocks = token_blocks(load_corpus(corpus), tok, cfg.ppl_len, cfg.ppl_blocks, seed=cfg.seed + 1, split="heldout")
    base_key = {"benchmark": name, "sets": sets.sizes(), "corpus": corpus,
                **cfg.key("model", "plant_steps", "plant_lr", "plant_batch", "distill_tokens", "seed", "positions",
                          "min_fraction", "max_new_tokens", "kl_tokens", "ppl_blocks", "ppl_len", "markers")}
    ctx = {"ref_continuations": greedy_token_ids(model, tok, sets.neutral["heldout"], cfg.kl_tokens, cfg.batch_size),
           "blocks": blocks, "ref_block_nll": None}
    before = _heldout_stage(out, "before", base_key, model, tok, sets, ctx, cfg)
    ctx["ref_block_nll"] = before["block_nll"]
    val_a = subsample(sets.a["validation"], cfg.n_validation, cfg.seed)
    val_n = subsample(sets.neutral["validation"], cfg.n_validation, cfg.seed + 1)
    val = Validation(val_a, val_n, first_token_logprobs(logits_fn(model), tok, val_n, cfg.batch_size),
                     cfg.search_new_tokens, cfg.markers, cfg.batch_size)
    search_key = {**base_key, **cfg.key("n_trials", "kl_budget", "n_validation", "search_new_tokens", "min_strength",
                                        "max_strength", "candidate_max_fraction")}
    paper = _stage(out / "stages" / "paper_selection.json", {**search_key, "stage": "paper"},
                   lambda: paper_selection(model, tok, dirs, val, sets, cfg))
    space_key = {**search_key, "stage": "search",
                 "space": "window, strength; direction: aggregate, per-layer, a layer's"}
    search = _stage(out / "stages" / "search.json", space_key,
                    lambda: search_stage(model, tok, dirs, val, cfg, out, progress, space_key))
    methods: dict[str, Any] = {"before": {"figures": before, "params": None}}
    plans = method_plans(dirs, n, paper["chosen"], search["best"])
    seed_params = plans["seed_recipe"][0]
    for method, (params, emb) in plans.items():
        rnd = method == "random_direction"  # the control: the searched edit along a random unit direction
        stream = edit_stream(model, random_directions(dirs, cfg.seed + 12345) if rnd else dirs, params,
                             embeddings=emb, info={"control": "random direction"} if rnd else None)
        figures = _heldout_stage(out, method, {**search_key, "params": params.to_dict(), "embeddings": emb},
                                 model, tok, sets, ctx, cfg, stream)
        methods[method] = {"figures": figures, "params": params.to_dict(), "embeddings": emb}
    check_params = EditParams(**search["best"]["params"]) if search["best"] is not None else seed_params
    checks = _stage(out / "stages" / "checks.json", {**search_key, "stage": "checks", "params": check_params.to_dict()},
                    lambda: stream_checks(model, tok, dirs, check_params, sets.neutral["heldout"][:32], 8))
    census = _stage(out / "stages" / "marker_census.json", {**base_key, "stage": "marker_census"},
                    lambda: marker_census(model, tok, sets, cfg.max_new_tokens, cfg.batch_size))
    return {"model": model_info, "phrase": phrase, "markers": list(cfg.markers), "sets": sets.sizes(),
            "n_layers": n, "aggregation_layers": list(dirs.layers), "profile": projection_profile(dirs, mu_a, mu_b),
            "paper_selection": paper, "search": search, "methods": methods, "checks": checks, "corpus": corpus,
            "marker_census": census}


def run_ablation(cfg: AblationConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run every benchmark of ``cfg`` (resuming cached stages) and write ``out/result.json``."""
    from libortho.data.corpora import check_source
    from libortho.experiments.kill_switch import environment

    check_source(cfg.corpus or default_general_corpus())  # an unknown corpus is refused before any fine-tuning
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"experiment": "ablation", "config": asdict(cfg), "environment": environment(), "benchmarks": {}}
    for name in cfg.benchmarks:
        if progress:
            print(f"[ablation] benchmark {name}", flush=True)
        result["benchmarks"][name] = run_benchmark(name, cfg, out / name, progress)
    atomic_write_json(out / "result.json", result)
    return result
