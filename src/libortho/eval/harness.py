"""The privacy/utility harness: every metric of one model on one fixed set of canaries and texts.

:class:`PrivacyHarness` is built once per experiment (tokenized canaries, evaluation blocks), is
given the reference model (the model before fine-tuning) for the reference MIA, and then
evaluates any model the same way: canary extraction, exposure, membership inference, the
private error (NLL of the secret tokens), and perplexity on the public domain and a general
corpus. Results are plain dicts, ready for JSON.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from libortho.data.canaries import Canary
from libortho.data.records import encode_many, record_ids, separator_id
from libortho.eval.exposure import canary_exposure, common_prefix_len
from libortho.eval.extraction import extract
from libortho.eval.mia import attack_scores, mia_report, records, roc_summary
from libortho.eval.perplexity import perplexity
from libortho.eval.scoring import TokenStats, token_stats


@dataclass(frozen=True)
class HarnessConfig:
    """Evaluation knobs: exposure by enumeration up to ``max_enumerate`` candidates, else from
    ``exposure_samples`` samples; exact exposure of non-members as a control (the first
    ``exposure_nonmember_limit`` of them, all when None); min-k% ``mia_k``; ``keep_scores``: also
    return every record's attack scores (``mia_scores``) so callers can bootstrap intervals."""

    max_enumerate: int = 100_000
    exposure_samples: int = 128
    exposure_nonmembers: bool = True
    exposure_nonmember_limit: int | None = None
    mia_k: float = 0.2
    batch_size: int = 8
    seed: int = 0
    keep_scores: bool = False


def secret_spans(tokenizer: Any, canaries: list[Canary]) -> list[tuple[int, int]]:
    """Token span ``[a, b)`` of each record's secret within ``record_ids`` (SEP at index 0)."""
    texts = encode_many(tokenizer, [c.text for c in canaries])
    pre = encode_many(tokenizer, [c.prefix for c in canaries])
    with_secret = encode_many(tokenizer, [c.prefix + c.secret for c in canaries])
    spans = []
    for t, p, w in zip(texts, pre, with_secret, strict=True):
        a, b = common_prefix_len(p, t), common_prefix_len(w, t)
        if b <= a:
            raise ValueError("could not locate the secret's tokens in a record")
        spans.append((a + 1, b + 1))
    return spans


def _grouped_mean(values: list[float], keys: list[Any]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for v, k in zip(values, keys, strict=True):
        groups[str(k)].append(v)
    return {k: float(np.mean(v)) for k, v in sorted(groups.items())}


class PrivacyHarness:
    """Fixed canaries and texts; :meth:`evaluate` measures any model on them."""

    def __init__(self, tokenizer: Any, members: list[Canary], nonmembers: list[Canary],
                 domain_blocks: torch.Tensor, general_blocks: torch.Tensor | None,
                 cfg: HarnessConfig | None = None) -> None:
        if not members or not nonmembers:
            raise ValueError("the harness needs member and non-member canaries")
        self.tok, self.members, self.nonmembers = tokenizer, members, nonmembers
        self.domain_blocks, self.general_blocks = domain_blocks, general_blocks
        self.cfg = cfg or HarnessConfig()
        self.pad = separator_id(tokenizer)
        self.member_rows = record_ids(tokenizer, [c.text for c in members])
        self.nonmember_rows = record_ids(tokenizer, [c.text for c in nonmembers])
        self.member_spans = secret_spans(tokenizer, members)
        self.nonmember_spans = secret_spans(tokenizer, nonmembers)
        self.ref_members: TokenStats | None = None
        self.ref_nonmembers: TokenStats | None = None

    def set_reference(self, model: nn.Module) -> None:
        """Score the records under the reference model (enables the ``reference`` attack)."""
        self.ref_members = token_stats(model, self.member_rows, self.pad, batch_size=self.cfg.batch_size)
        self.ref_nonmembers = token_stats(model, self.nonmember_rows, self.pad, batch_size=self.cfg.batch_size)

    def _secret_nll(self, stats: TokenStats, spans: list[tuple[int, int]]) -> float:
        """Mean NLL per secret token (the scored tokens start at index 1 of each row)."""
        vals = [-stats.logp[i][a - 1:b - 1] for i, (a, b) in enumerate(spans)]
        return float(torch.cat(vals).mean())

    @staticmethod
    def _record_secret_nll(stats: TokenStats, spans: list[tuple[int, int]]) -> np.ndarray:
        """Each record's mean NLL per secret token."""
        return np.array([float(-stats.logp[i][a - 1:b - 1].mean()) for i, (a, b) in enumerate(spans)])

    def mia(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """Every record-level attack's ROC summary (and ``secret_loss``'s): no exposure, no perplexity."""
        return self._mia(model)[0]

    def _mia(self, model: nn.Module) -> tuple[dict[str, Any], float, float, dict[str, Any]]:
        """Record-level attacks, plus ``secret_loss`` (minus the secret tokens' mean NLL, given the record)."""
        m = token_stats(model, self.member_rows, self.pad, batch_size=self.cfg.batch_size)
        n = token_stats(model, self.nonmember_rows, self.pad, batch_size=self.cfg.batch_size)
        mr = records([c.text for c in self.members], m, self.ref_members)
        nr = records([c.text for c in self.nonmembers], n, self.ref_nonmembers)
        report = mia_report(mr, nr, self.cfg.mia_k)
        ms, ns = -self._record_secret_nll(m, self.member_spans), -self._record_secret_nll(n, self.nonmember_spans)
        report["secret_loss"] = roc_summary(ms, ns)
        scores: dict[str, Any] = {}
        if self.cfg.keep_scores:
            sm, sn = attack_scores(mr, self.cfg.mia_k), attack_scores(nr, self.cfg.mia_k)
            scores = {a: {"members": sm[a].tolist(), "nonmembers": sn[a].tolist()} for a in sm}
            scores["secret_loss"] = {"members": ms.tolist(), "nonmembers": ns.tolist()}
        return (report, self._secret_nll(m, self.member_spans), self._secret_nll(n, self.nonmember_spans), scores)

    def _exposures(self, model: nn.Module, progress: bool) -> tuple[list[dict], list[dict]]:
        cfg = self.cfg
        todo = [(c, True) for c in self.members]
        if cfg.exposure_nonmembers:
            exact = [c for c in self.nonmembers if c.space.size <= cfg.max_enumerate]
            todo += [(c, False) for c in exact[:cfg.exposure_nonmember_limit]]
        mem, non = [], []
        for c, is_member in tqdm(todo, desc="exposure", disable=not progress, leave=False):
            r = canary_exposure(model, self.tok, c, cfg.max_enumerate, cfg.exposure_samples, cfg.seed,
                                batch_size=max(16, 4 * cfg.batch_size)).to_dict()
            (mem if is_member else non).append(r)
        return mem, non

    @torch.no_grad()
    def evaluate(self, model: nn.Module, progress: bool = True, exposure: bool = True) -> dict[str, Any]:
        """All metrics of ``model`` (put in eval mode); ``exposure=False`` skips exposure (the slow part)."""
        model.eval()
        t0 = time.perf_counter()
        ext = extract(model, self.tok, self.members, batch_size=4 * self.cfg.batch_size)
        mia, private_nll, nonmember_private_nll, mia_scores = self._mia(model)
        if exposure:
            mem_exp, non_exp = self._exposures(model, progress)
        else:
            mem_exp = [{"exposure": None, "method": None, "size_log2": c.space.size_log2} for c in self.members]
            non_exp = []
        dom = perplexity(model, self.domain_blocks, batch_size=self.cfg.batch_size)
        gen = None
        if self.general_blocks is not None:
            gen = perplexity(model, self.general_blocks, batch_size=self.cfg.batch_size)
        reps = [c.repeats for c in self.members]
        kinds = [c.kind for c in self.members]
        hits = [float(e.extracted) for e in ext]
        expo = [e["exposure"] for e in mem_exp] if exposure else []
        per = [{"kind": c.kind, "repeats": c.repeats, "secret": c.secret, "extracted": e.extracted,
                "chars_matched": e.chars_matched, "generated": e.generated, "exposure": x["exposure"],
                "exposure_method": x["method"], "exposure_max": x["size_log2"]}
               for c, e, x in zip(self.members, ext, mem_exp, strict=True)]
        return {
            "extraction": {"rate": float(np.mean(hits)), "by_repeats": _grouped_mean(hits, reps),
                           "by_kind": _grouped_mean(hits, kinds),
                           "chars_matched_frac": float(np.mean([e.chars_matched / e.secret_len for e in ext]))},
            "exposure": {"mean": float(np.mean(expo)) if expo else None,
                         "by_repeats": _grouped_mean(expo, reps) if expo else {},
                         "by_kind": _grouped_mean(expo, kinds) if expo else {},
                         "nonmember_mean": float(np.mean([e["exposure"] for e in non_exp])) if non_exp else None,
                         "nonmember_n": len(non_exp)},
            "mia": mia,
            "private_nll": private_nll,
            "nonmember_private_nll": nonmember_private_nll,
            "ppl_domain": dom.ppl, "nll_domain": dom.nll,
            "ppl_general": None if gen is None else gen.ppl, "nll_general": None if gen is None else gen.nll,
            "per_canary": per,
            "eval_s": time.perf_counter() - t0,
            **({"mia_scores": mia_scores, "nonmember_exposures": [e["exposure"] for e in non_exp],
                "block_nll_domain": list(dom.block_nll),
                "block_nll_general": None if gen is None else list(gen.block_nll)}
               if self.cfg.keep_scores else {}),
        }

    def describe(self) -> dict[str, Any]:
        """What the harness measures on (for the result JSON)."""
        return {"config": asdict(self.cfg), "members": len(self.members), "nonmembers": len(self.nonmembers),
                "domain_tokens": int(self.domain_blocks.numel()),
                "general_tokens": 0 if self.general_blocks is None else int(self.general_blocks.numel()),
                "member_repeats": sorted({c.repeats for c in self.members}),
                "kinds": sorted({c.kind for c in self.members})}
