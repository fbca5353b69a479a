"""Is the production exposure estimate (64 samples + skew-normal tail fit) trustworthy? Check it against
exact enumeration on a fine-tuned model.

The kill-switch harness reads exposure of 10^9-10^18-candidate secrets from a skew-normal fitted to
64 sampled candidates. Here every secret kind the harness uses keeps its own template, but only its
last few characters are free (10^4 candidates for the digit kinds, 62^2 for passwords), so the exact
rank is found by enumeration. Members are fine-tuned into the model 1-16 times (exposures from ~0 to
log2|R|); as many non-members per kind come from the same generator (never trained on). For every
canary: exact exposure (the library's enumeration), and the production estimate for many
independent sample seeds, read from the enumerated scores (the very sample
:func:`~libortho.eval.exposure.estimated_exposure` draws; a few seeds are also run through that
function directly, and the two must agree), plus larger samples and the empirical rank.

Stages are cached under ``work``: the fine-tuned model (by a key of its configuration), then one
file per canary (scores of every candidate, exact result, direct estimates), then one per canary's
estimates; a re-run skips whatever is already there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from libortho.atomic import atomic_write_file, atomic_write_json
from libortho.data.canaries import KINDS, Canary, SecretSpace, luhn_check_digit, make_canaries, private_documents
from libortho.data.records import TokenRows, mixture, pack_records, record_ids, separator_id
from libortho.eval.exposure import (
    candidate_scores,
    char_layout,
    empirical_exposure,
    estimated_exposure,
    exposure_from_rank,
    mid_rank,
    prefix_cache,
    sample_candidates,
    skewnorm_exposure,
)
from libortho.experiments import exposure_stats as st
from libortho.experiments.store import cached_model
from libortho.train.loop import TrainConfig, train

HARNESS_BATCH = 32  # the batch size the smollm2 harness passes to estimated_exposure: max(16, 4 * 8)


@dataclass(frozen=True)
class ExposureCheckConfig:
    """What is fine-tuned and measured.

    digit_free / password_free: free characters of the restricted spaces (10^4 / 62^2 candidates;
    e-mail's three generator digits get one more); repeats: how often each member is inserted;
    n_samples: the production sample size (the smollm2 preset's ``exposure_samples``); every estimator
    runs at ``n_samples`` and ``extra_sample_sizes`` for ``n_seeds`` seeds; ``direct_seeds`` of them
    also through ``estimated_exposure`` itself. tail_cap_bits: the ceiling of the "tail" reading (above
    every production space), used instead of the restricted space's log2|R|. The estimator passes when
    its error band is within ±band_bits pooled, in every exact-exposure bin (``bin_edges``) with at least
    ``min_bin_canaries`` canaries, and for the canaries that rank first (see ``exposure_stats.judge``).

    The fine-tune is short (12 steps: ~7 min on one thread) and therefore strong (lr 1e-3): with the
    kill-switch preset's lr 2e-4 a member inserted 16 times reached only 7 of 13.3 bits and one inserted
    4 times 1 bit (measured), leaving the tail this check is about empty.
    """

    model: str = "smollm2-135m"
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    n_per_kind: int = 4
    repeats: tuple[int, ...] = (1, 2, 4, 16)
    digit_free: int = 4
    password_free: int = 2
    domain: str = "shakespeare"
    block_len: int = 128
    public_blocks: int = 16
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, epochs=2.0, batch_size=8,
                                                                      warmup=0.2))
    n_samples: int = 64
    extra_sample_sizes: tuple[int, ...] = (256, 1024)
    n_seeds: int = 30
    direct_seeds: int = 1
    tail_cap_bits: float = 64.0
    bin_edges: tuple[float, ...] = (4.0, 8.0, 12.0)
    band_bits: float = 1.0
    min_bin_canaries: int = 3
    coverage: float = 0.9
    n_boot: int = 1000
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.digit_free < 2 or self.password_free < 1:
            raise ValueError("digit_free must be >= 2 and password_free >= 1")
        if self.n_seeds < 2 or not 0 <= self.direct_seeds <= self.n_seeds:
            raise ValueError("need n_seeds >= 2 and 0 <= direct_seeds <= n_seeds")
        if self.n_samples < 8 or any(n < 8 for n in self.extra_sample_sizes):
            raise ValueError("the skew-normal fit needs sample sizes >= 8")

    @property
    def sample_sizes(self) -> tuple[int, ...]:
        return (self.n_samples, *self.extra_sample_sizes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def restrict(canary: Canary, n_free: int, rng: random.Random | None = None) -> Canary:
    """The same record with only the last ``n_free`` free characters of its secret left free (the others
    join the space's fixed head); a space with fewer free characters is first extended from ``rng``."""
    space = canary.space
    free = space.free_part(canary.secret)
    if n_free > len(free):
        if rng is None:
            raise ValueError(f"widening a {len(free)}-character space to {n_free} needs an rng")
        free += "".join(rng.choice(space.alphabet) for _ in range(n_free - len(free)))
    cut = len(free) - n_free
    narrow = SecretSpace(space.head + free[:cut], space.alphabet, n_free, space.luhn)
    return replace(canary, secret=narrow.compose(free[cut:]), space=narrow)


def build_canaries(cfg: ExposureCheckConfig) -> tuple[list[Canary], list[Canary]]:
    """Members and non-members of every kind (the project's generator), restricted to enumerable spaces."""
    members, nonmembers = make_canaries(cfg.n_per_kind, cfg.kinds, cfg.repeats, cfg.seed, cfg.digit_free)
    rng = random.Random(f"{cfg.seed}:restrict")

    def free(c: Canary) -> int:
        return cfg.password_free if c.kind == "password" else cfg.digit_free

    return [restrict(c, free(c), rng) for c in members], [restrict(c, free(c), rng) for c in nonmembers]


def _logprob_at(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    lse = torch.logsumexp(logits.float(), dim=-1).double()
    return logits.float().gather(-1, targets.unsqueeze(-1)).squeeze(-1).double() - lse


@torch.no_grad()
def luhn_candidate_scores(model: nn.Module, tokenizer: Any, canary: Canary,
                          batch_size: int = 32) -> torch.Tensor | None:
    """Every candidate of a Luhn space scored char-wise (stems, all last digits at once, then the check
    digit on the stems' cache): 3x fewer tokens than one by one. None when the tokenizer does not spell
    the free digits and the check digit one token each."""
    space = canary.space
    if not space.luhn or space.n_free < 2:
        return None
    plain = SecretSpace(space.head, space.alphabet, space.n_free)
    layout = char_layout(tokenizer, replace(canary, secret=canary.secret[:-1], space=plain))
    if layout is None:
        return None
    tok_of = dict(zip(space.alphabet, layout.char_tokens, strict=True))
    probes = [space.alphabet[j % len(space.alphabet)] * space.n_free for j in range(len(space.alphabet))]
    for f in probes:
        want = [*layout.context, *layout.head, *(tok_of[c] for c in space.compose(f)[len(space.head):])]
        if record_ids(tokenizer, [canary.prefix + space.compose(f)])[0] != want:
            return None
    kv, last = prefix_cache(model, layout.context + layout.head)
    chars = torch.tensor(layout.char_tokens)
    n_chars, n = chars.numel(), space.n_free
    stems = torch.cartesian_prod(*[torch.arange(n_chars)] * (n - 1)).view(-1, n - 1)
    checks = torch.tensor([space.alphabet.index(luhn_check_digit(space.head + "".join(space.alphabet[i] for i in s)
                                                                 + space.alphabet[e]))
                           for s in stems.tolist() for e in range(n_chars)]).view(-1, n_chars)
    out = torch.empty(stems.shape[0], n_chars, dtype=torch.float64)
    for i in range(0, stems.shape[0], batch_size):
        ids = chars[stems[i:i + batch_size]]
        b = ids.shape[0]
        batch_kv = copy.deepcopy(kv)
        batch_kv.batch_repeat_interleave(b)
        res = model(input_ids=ids, past_key_values=batch_kv, use_cache=True)
        logits, stem_kv = res.logits, res.past_key_values  # the cache now holds context + stem
        total = last[ids[:, 0]]
        if n > 2:
            total = total + _logprob_at(logits[:, :-1], ids[:, 1:]).sum(dim=1)
        ends = torch.log_softmax(logits[:, -1].double(), dim=-1)[:, chars]
        stem_kv.batch_repeat_interleave(n_chars)
        last_logits = model(input_ids=chars.repeat(b).view(-1, 1), past_key_values=stem_kv, use_cache=True).logits
        check = _logprob_at(last_logits[:, -1], chars[checks[i:i + b].reshape(-1)]).view(b, n_chars)
        out[i:i + b] = total.unsqueeze(1) + ends + check
    return out.view(-1)


def all_scores(model: nn.Module, tokenizer: Any, canary: Canary, batch_size: int = 256) -> tuple[torch.Tensor, str]:
    """(log-probability of every candidate in enumeration order, how it was enumerated)."""
    if canary.space.luhn:
        fast = luhn_candidate_scores(model, tokenizer, canary, max(1, batch_size // 8))
        if fast is not None:
            return fast, "charwise+luhn"
    how = "charwise" if char_layout(tokenizer, canary) is not None else "continuations"
    return candidate_scores(model, tokenizer, canary, batch_size), how


def exact_record(model: nn.Module, tokenizer: Any, canary: Canary, cfg: ExposureCheckConfig
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """Scores of every candidate, the exact rank/exposure, and ``direct_seeds`` production estimates."""
    t0 = time.perf_counter()
    scores, how = all_scores(model, tokenizer, canary, cfg.batch_size)
    space = canary.space
    idx = space.index(canary.secret)
    rank = mid_rank(float(scores[idx]), torch.cat([scores[:idx], scores[idx + 1:]]))
    t1 = time.perf_counter()
    direct = []
    for s in range(cfg.direct_seeds):
        r = estimated_exposure(model, tokenizer, canary, cfg.n_samples, seed=s, batch_size=HARNESS_BATCH)
        direct.append({"seed": s, "exposure": r.exposure, "secret_logprob": r.secret_logprob})
    info = {"kind": canary.kind, "member": canary.member, "repeats": canary.repeats, "secret": canary.secret,
            "space_size": space.size, "size_log2": space.size_log2, "enumeration": how, "rank": rank,
            "exact": exposure_from_rank(rank, space.size_log2), "censored": st.is_censored(rank),
            "secret_logprob": float(scores[idx]), "direct": direct,
            "enumerate_s": t1 - t0, "direct_s": time.perf_counter() - t1}
    return scores.numpy(), info


def _index(pos: dict[str, int], base: int, free: str) -> int:
    out = 0
    for ch in free:
        out = out * base + pos[ch]
    return out


def estimates(scores: np.ndarray, canary: Canary, cfg: ExposureCheckConfig) -> dict[str, list[float]]:
    """Per seed: the skew-normal tail reading (capped at ``tail_cap_bits``) and the empirical rank for every
    sample size, and the production call itself (capped at this space's log2|R|) at ``n_samples``."""
    space = canary.space
    pos = {c: i for i, c in enumerate(space.alphabet)}
    secret = float(scores[space.index(canary.secret)])
    out: dict[str, list[float]] = {}
    for n in cfg.sample_sizes:
        tail, emp = [], []
        for s in range(cfg.n_seeds):
            sample = scores[[_index(pos, len(pos), f) for f in sample_candidates(space, canary.secret, n, s)]]
            tail.append(skewnorm_exposure(-secret, -sample, cfg.tail_cap_bits))
            emp.append(empirical_exposure(secret, sample, space.size_log2))
        out[f"skewnorm_{n}"], out[f"empirical_{n}"] = tail, emp
    out[f"as_called_{cfg.n_samples}"] = [min(x, space.size_log2) for x in out[f"skewnorm_{cfg.n_samples}"]]
    return out


def _load_base(cfg: ExposureCheckConfig) -> tuple[Callable[[], nn.Module], Any]:
    """(loader of the model before fine-tuning, tokenizer); ``tiny`` is a random-init byte-level Llama."""
    from libortho.models import ByteTokenizer, build_tiny_llama, load_model

    if cfg.model == "tiny":
        return (lambda: build_tiny_llama(seed=cfg.seed)), ByteTokenizer()
    _, tok = load_model(cfg.model)
    if tok is None:
        raise ValueError(f"model {cfg.model!r} has no tokenizer: the exposure check needs one")
    return (lambda: load_model(cfg.model)[0]), tok


def training_rows(cfg: ExposureCheckConfig, tokenizer: Any, members: list[Canary]) -> TokenRows:
    """Public domain blocks and the packed member records (each ``repeats`` times), shuffled by seed."""
    from libortho.data import load_corpus, token_blocks

    blocks = token_blocks(load_corpus(cfg.domain), tokenizer, cfg.block_len, cfg.public_blocks, seed=cfg.seed)
    private = pack_records(record_ids(tokenizer, private_documents(members, cfg.seed)), cfg.block_len,
                           separator_id(tokenizer))
    return mixture(TokenRows.from_blocks(blocks), private, cfg.seed)


def finetuned(cfg: ExposureCheckConfig, members: list[Canary], work: Path, fresh: bool = False,
              progress: bool = True) -> tuple[nn.Module, Any, dict[str, Any], dict[str, Any]]:
    """(fine-tuned model, tokenizer, stage info, cache key): trained once per key, then loaded."""
    load_pre, tok = _load_base(cfg)
    key = {"stage": "exposure_check_finetune", "model": cfg.model, "seed": cfg.seed, "train": asdict(cfg.finetune),
           "data": [cfg.domain, cfg.block_len, cfg.public_blocks], "members": _digest([c.to_dict() for c in members])}

    def build() -> tuple[nn.Module, dict[str, Any]]:
        rows = training_rows(cfg, tok, members)
        model = load_pre()
        tl = train(model, rows, cfg.finetune, progress=progress, desc="fine-tune (public + members)")
        return model, {"wall_s": tl.wall_s, "steps": tl.steps, "tokens": tl.tokens, "rows": len(rows),
                       "first_loss": tl.losses[0], "final_loss": tl.losses[-1]}

    model, info = cached_model(work / "ft", key, build, fresh)
    return model.eval(), tok, info, key


def _cached_json(path: Path, make: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    if path.is_file():
        return json.loads(path.read_text()), True
    out = make()
    atomic_write_json(path, out)
    return out, False


def _canary_stage(model: nn.Module, tok: Any, canary: Canary, cfg: ExposureCheckConfig, work: Path,
                  model_key: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[float]], bool]:
    """Exact record and estimates of one canary, each cached (scores as .npy beside the exact JSON)."""
    key = _digest({"model": model_key, "canary": canary.to_dict(), "n": cfg.n_samples, "direct": cfg.direct_seeds})
    base = work / "canaries" / f"{canary.kind}-{'m' if canary.member else 'n'}-{key}"
    npy, meta = base.with_suffix(".npy"), base.with_suffix(".json")
    reused = meta.is_file() and npy.is_file()
    if reused:
        info, scores = json.loads(meta.read_text()), np.load(npy)
    else:
        scores, info = exact_record(model, tok, canary, cfg)

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, scores)

        atomic_write_file(npy, save)
        atomic_write_json(meta, info)  # written last: marks the canary done
    def timed() -> dict[str, Any]:
        t0 = time.perf_counter()
        return {"estimates": estimates(scores, canary, cfg), "wall_s": time.perf_counter() - t0}

    est_key = _digest(["v2", cfg.sample_sizes, cfg.n_seeds, cfg.tail_cap_bits])
    est, _ = _cached_json(work / "estimates" / f"{base.name}-{est_key}.json", timed)
    return {**info, "estimate_s": est["wall_s"]}, est["estimates"], reused


def _luhn_check(model: nn.Module, tok: Any, cards: list[Canary], work: Path, model_key: dict[str, Any],
                cfg: ExposureCheckConfig) -> dict[str, Any] | None:
    """The char-wise Luhn enumeration against the library's one-by-one path on one card, one digit narrower."""
    if not cards:
        return None
    c = restrict(cards[0], cfg.digit_free - 1, random.Random(0))

    def make() -> dict[str, Any]:
        t0 = time.perf_counter()
        fast = luhn_candidate_scores(model, tok, c, max(1, cfg.batch_size // 8))
        t1 = time.perf_counter()
        ref = candidate_scores(model, tok, c, cfg.batch_size)
        t2 = time.perf_counter()
        if fast is None:
            return {"used": False, "candidates": c.space.size}
        i = c.space.index(c.secret)
        ranks = [mid_rank(float(s[i]), torch.cat([s[:i], s[i + 1:]])) for s in (fast, ref)]
        return {"used": True, "candidates": c.space.size, "max_abs_logprob_diff": float((fast - ref).abs().max()),
                "rank_charwise": ranks[0], "rank_library": ranks[1], "charwise_s": t1 - t0, "library_s": t2 - t1}

    out, _ = _cached_json(work / "checks" / f"luhn-{_digest([model_key, c.to_dict()])}.json", make)
    return out


def summarise(records: list[dict[str, Any]], cfg: ExposureCheckConfig) -> dict[str, Any]:
    """Error bands of every estimator (uncensored canaries), the production call over all canaries,
    the censored canaries, and the conclusion."""
    kw = {"band_bits": cfg.band_bits, "coverage": cfg.coverage, "n_boot": cfg.n_boot, "seed": cfg.seed}
    errors: dict[str, Any] = {}
    for n in cfg.sample_sizes:
        errors[f"skewnorm_{n}"] = st.summarise_estimator(records, f"skewnorm_{n}", cfg.bin_edges, **kw)
        emp = st.summarise_estimator(records, f"empirical_{n}", cfg.bin_edges, **kw)
        reach = [r for r in records if r["exact"] <= math.log2(n + 1)]
        emp["in_range"] = st.summarise_estimator(reach, f"empirical_{n}", cfg.bin_edges, **kw)["all"] if reach else None
        errors[f"empirical_{n}"] = emp
    called = f"as_called_{cfg.n_samples}"
    every = [{**r, "censored": False} for r in records]
    errors[called] = st.summarise_estimator(every, called, cfg.bin_edges, **kw)
    censored = {f"skewnorm_{n}": st.censored_summary(records, f"skewnorm_{n}", cfg.band_bits)
                for n in cfg.sample_sizes}
    return {"errors": errors, "censored": censored,
            "conclusion": st.conclusion(errors, censored, f"skewnorm_{cfg.n_samples}", cfg.band_bits, cfg.coverage,
                                        cfg.sample_sizes, cfg.min_bin_canaries)}


def _progress_line(i: int, n: int, c: Canary, info: dict[str, Any], est: dict[str, list[float]], reused: bool,
                   n_samples: int) -> str:
    who = f"member x{c.repeats}" if c.member else "non-member"
    how = "cached" if reused else f"{info['enumerate_s']:.0f} s"
    return (f"[{i + 1}/{n}] {c.kind:<8} {who:<11} exact {info['exact']:6.2f} / {info['size_log2']:.2f} bits "
            f"(rank {info['rank']:g}, {info['enumeration']}, {how}); {n_samples}-sample estimate median "
            f"{np.median(est[f'skewnorm_{n_samples}']):6.2f}")


def run_exposure_check(cfg: ExposureCheckConfig, work: str | Path, progress: bool = True, fresh: bool = False,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune (cached), enumerate and estimate every canary (cached), and return the result dict."""
    work, t0 = Path(work), time.perf_counter()
    members, nonmembers = build_canaries(cfg)
    model, tok, ft_info, model_key = finetuned(cfg, members, work, fresh, progress)
    log(f"fine-tuned model {'reused' if ft_info['reused'] else 'trained'} ({ft_info['wall_s']:.0f} s, "
        f"{ft_info['steps']} steps, loss {ft_info['first_loss']:.3f} -> {ft_info['final_loss']:.3f})")
    canaries = members + nonmembers
    records, reused, t_canaries = [], 0, time.perf_counter()
    for i, c in enumerate(canaries):
        info, est, was = _canary_stage(model, tok, c, cfg, work, model_key)
        reused += was
        records.append({**info, "estimates": est})
        log(_progress_line(i, len(canaries), c, info, est, was, cfg.n_samples))
    checks = {"lookup_vs_direct": st.direct_agreement(records, cfg.n_samples),
              "luhn_vs_library": _luhn_check(model, tok, [c for c in members if c.kind == "card"], work, model_key,
                                             cfg)}
    from libortho.experiments.config import preset
    from libortho.experiments.kill_switch import environment

    production = preset("smollm2-135m").harness
    result = {"experiment": "exposure_check", "config": cfg.to_dict(), "environment": environment(),
              "production": {"model": "smollm2-135m", "exposure_samples": production.exposure_samples,
                             "estimator_batch": max(16, 4 * production.batch_size)},
              "stages": {"finetune": ft_info, "canaries": {"total": len(records), "reused": reused,
                                                           "wall_s": time.perf_counter() - t_canaries}},
              "checks": checks, "canaries": records, **summarise(records, cfg)}
    result["wall_s"] = time.perf_counter() - t0
    log(f"conclusion: {result['conclusion']['statement']}")
    return result
