"""Data of the separation experiment: canaries inside public-domain passages, and the training rows.

Every member record is ``passage + "\\n" + canary sentence``: a passage of the public domain corpus
(taken from a part of its training split that the public blocks never use, so dropping the records
costs real text) followed by a fictitious person's secret. Only the secret's tokens are private.
Non-members are built the same way *on the members' passages* (each passage serves one member and
``nonmembers / members`` non-members), so membership inference compares records whose public text
is equally familiar and differ only in the canary sentence. Every secret space is small enough to
enumerate (``free_len`` digits), so exposure is exact.

Label noise: a seeded ``fraction`` of the member records is marked ``private: false``, i.e. the
curator failed to label them; label-reading methods then train their secrets into the shared
weights like public text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from libortho.data.blocks import split_documents, token_blocks
from libortho.data.canaries import Canary, make_canary
from libortho.data.corpora import load_corpus
from libortho.data.private import PrivateRecord, pack_private_records
from libortho.data.records import TokenRows


def passages(docs: list[str], n: int, chars: int, seed: int) -> list[str]:
    """``n`` distinct passages of whole lines (about ``chars`` characters each) from ``docs``, seeded."""
    lines = [ln.strip() for d in docs for ln in d.splitlines() if ln.strip()]
    out: list[str] = []
    i = 0
    while i < len(lines):
        chunk: list[str] = []
        while i < len(lines) and sum(len(x) + 1 for x in chunk) < chars:
            chunk.append(lines[i])
            i += 1
        out.append("\n".join(chunk))
    if len(out) < n:
        raise ValueError(f"the passage pool has {len(out)} passages of ~{chars} characters, {n} are needed")
    return random.Random(seed).sample(out, n)


def draw_canaries(n_members: int, n_nonmembers: int, kinds: tuple[str, ...], free_len: int, seed: int
                  ) -> tuple[list[Canary], list[Canary]]:
    """Members and non-members cycling through ``kinds``; secrets and sentence prefixes all distinct."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[list[Canary]] = [[], []]
    for which, count in ((0, n_members), (1, n_nonmembers)):
        for i in range(count):
            kind = kinds[i % len(kinds)]
            for _ in range(1000):
                c = make_canary(kind, rng, 0, which == 0, digits_len=free_len, free_len=free_len)
                if c.secret not in seen and c.prefix not in seen:
                    break
            else:
                raise ValueError(f"cannot draw {count} distinct {kind} canaries with {free_len} free digits")
            seen.update((c.secret, c.prefix))
            out[which].append(c)
    return out[0], out[1]


def in_passage(c: Canary, passage: str, repeats: int) -> Canary:
    """The canary with its record's passage in front (so prompts and exposure see the same left context)."""
    return replace(c, prefix=f"{passage}\n{c.prefix}", repeats=repeats)


@dataclass
class SeparationData:
    """Canaries, training rows and evaluation text of one seed."""

    members: list[Canary]
    nonmembers: list[Canary]
    public: TokenRows  # public domain blocks
    records: list[PrivateRecord]  # one per member, labelled
    repeats: int
    block_len: int
    tokenizer: Any
    domain_eval: torch.Tensor
    general_eval: torch.Tensor
    calibration: torch.Tensor
    general_train: torch.Tensor | None
    general_name: str
    seed: int
    _rows: dict[float, TokenRows] = field(default_factory=dict)

    def unlabelled(self, fraction: float) -> list[int]:
        """Indices of the member records left unlabelled at this label-noise fraction (seeded, nested)."""
        order = list(range(len(self.records)))
        random.Random(self.seed + 7919).shuffle(order)
        return sorted(order[:round(fraction * len(order))])

    def rows(self, label_noise: float = 0.0) -> TokenRows:
        """Public blocks + every member record ``repeats`` times (a ``label_noise`` share unlabelled)."""
        if label_noise not in self._rows:
            off = set(self.unlabelled(label_noise))
            recs = [replace(r, private=False) if i in off else r for i, r in enumerate(self.records)]
            priv = pack_private_records(self.tokenizer, recs, self.block_len, [self.repeats] * len(recs), self.seed)
            self._rows[label_noise] = _shuffle(TokenRows.cat([self.public, priv]), self.seed)
        return self._rows[label_noise]

    def rows_without_records(self) -> TokenRows:
        """Public blocks only, in the order they have in :meth:`rows` ('retrain, records dropped')."""
        full = self.rows(0.0)
        keep = full.seq_ids()[:, 0] >= PUBLIC_SEQ0
        return full.subset(keep.nonzero().flatten())

    def member_records(self, idx: list[int]) -> TokenRows:
        """Rows of the given member records once each, labelled (the relearning attack's data)."""
        return pack_private_records(self.tokenizer, [self.records[i] for i in idx], self.block_len, seed=self.seed)

    def describe(self) -> dict[str, Any]:
        full = self.rows(0.0)
        return {"members": len(self.members), "nonmembers": len(self.nonmembers), "repeats": self.repeats,
                "public_rows": len(self.public), "public_tokens": self.public.tokens,
                "train_rows": len(full), "train_tokens": full.tokens, "private_tokens": full.private_tokens,
                "domain_eval_tokens": int(self.domain_eval.numel()),
                "general_eval_tokens": int(self.general_eval.numel()), "general_corpus": self.general_name,
                "calibration_tokens": int(self.calibration.numel()),
                "secret_spaces": sorted({c.space.size for c in self.members}),
                "kinds": sorted({c.kind for c in self.members})}


PUBLIC_SEQ0 = 1 << 62  # public blocks' sequence ids start here (record ids are 60-bit hashes)


def _shuffle(rows: TokenRows, seed: int) -> TokenRows:
    return rows.subset(torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)))


def build_separation_data(cfg: Any, seed: int, tok: Any, general_name: str) -> SeparationData:
    """Everything of ``seed`` from the experiment config (see :class:`SeparationExpConfig`)."""
    domain_docs = load_corpus(cfg.domain)
    train_docs = split_documents(domain_docs, 0)["train"]
    parts = split_documents(train_docs, seed=101, held_out_fraction=0.3)  # blocks | passage pool
    members, nonmembers = draw_canaries(cfg.members, cfg.nonmembers, cfg.kinds, cfg.free_len, seed)
    pool = passages(parts["heldout"], cfg.members, cfg.context_chars, seed)
    members = [in_passage(c, p, cfg.repeats) for c, p in zip(members, pool, strict=True)]
    nonmembers = [in_passage(c, pool[i % len(pool)], 0) for i, c in enumerate(nonmembers)]
    records = [PrivateRecord(c.text, c.secret, id=f"member-{seed}-{i}") for i, c in enumerate(members)]
    blocks = token_blocks(parts["train"], tok, cfg.block_len, cfg.public_blocks, seed=seed, split="train",
                          held_out_fraction=0.05)
    general_docs = load_corpus(general_name)
    from libortho.data import calibration_blocks

    pretrain = None
    if cfg.model == "tiny":
        pretrain = token_blocks(general_docs, tok, cfg.block_len, cfg.pretrain_blocks, seed=seed + 3)
    data = SeparationData(
        members, nonmembers, TokenRows.from_blocks(blocks, first_seq=PUBLIC_SEQ0), records, cfg.repeats,
        cfg.block_len, tok,
        domain_eval=token_blocks(domain_docs, tok, cfg.eval_len, cfg.eval_blocks, seed=seed + 1, split="heldout"),
        general_eval=token_blocks(general_docs, tok, cfg.eval_len, cfg.general_blocks, seed=seed + 1,
                                  split="heldout"),
        calibration=calibration_blocks([cfg.domain, general_name], tok, cfg.calib_blocks, cfg.calib_len,
                                       seed=seed + 2),
        general_train=pretrain, general_name=general_name, seed=seed)
    data.rows(0.0)  # pack the records now: one longer than block_len fails here, before any training
    return data
