"""Token rows for training and scoring: records behind a separator, packed private rows, mixtures.

Every private record is seen by the model as ``[SEP] + tokens(text)``, in training and in every
metric (extraction prompts, exposure, membership inference), so the left context of a record is
the same everywhere. ``SEP`` is the tokenizer's EOS token (BOS when there is no EOS).

Training data is a :class:`TokenRows` (``input_ids`` and ``labels``, ``-100`` where no loss is
taken). Public rows are contiguous blocks of the public corpus; private rows pack whole records
(never split across rows) and pad the remainder with ``SEP`` at label ``-100``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (Hugging Face tokenizers and the byte tokenizer)."""
    from libortho.data.blocks import _encode_many

    return _encode_many(tokenizer, [text])[0]


def encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """:func:`encode` for many texts (batched for Hugging Face tokenizers)."""
    from libortho.data.blocks import _encode_many

    return _encode_many(tokenizer, texts) if texts else []


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def separator_id(tokenizer: Any) -> int:
    """The token placed before every record (EOS, else BOS); ValueError when the tokenizer has neither."""
    for attr in ("eos_token_id", "bos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int):
            return tid
    raise ValueError("the tokenizer has no EOS or BOS token to separate records with")


def record_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """``[SEP] + tokens(text)`` for each text."""
    sep = separator_id(tokenizer)
    return [[sep, *ids] for ids in encode_many(tokenizer, texts)]


@dataclass(frozen=True)
class TokenRows:
    """``input_ids`` and ``labels`` of shape (n, L); labels are ``-100`` where no loss is taken.

    Two optional per-token tensors serve the separation methods (:mod:`libortho.train.separation`):
    ``private`` (bool, aligned with ``labels``) marks label tokens that are private (a record's
    secret span; None means none is), and ``seq`` (int64) gives every token the id of the sequence
    it belongs to (a record id for private records, a block id for public text, -1 for padding;
    None means each row is one sequence). Rows built without them behave exactly as before.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    private: torch.Tensor | None = None
    seq: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.labels.shape or self.input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(self.input_ids.shape)} and labels {tuple(self.labels.shape)} "
                             "must be equal (n, L) tensors")
        for name, dtype in (("private", torch.bool), ("seq", torch.long)):
            t = getattr(self, name)
            if t is not None and (t.shape != self.input_ids.shape or t.dtype != dtype):
                raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(self.input_ids.shape)}, "
                                 f"got {t.dtype} {tuple(t.shape)}")
        if self.private is not None and bool((self.private & (self.labels == IGNORE)).any()):
            raise ValueError("a token marked private carries no loss (label -100)")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        """Number of tokens that carry a loss."""
        return int((self.labels != IGNORE).sum())

    @property
    def private_tokens(self) -> int:
        """Number of loss-carrying tokens marked private."""
        return 0 if self.private is None else int(self.private.sum())

    def private_mask(self) -> torch.Tensor:
        """``private`` as a bool tensor (all False when not given)."""
        return torch.zeros_like(self.labels, dtype=torch.bool) if self.private is None else self.private

    def seq_ids(self) -> torch.Tensor:
        """``seq`` (when not given: row i is sequence i, padding included)."""
        if self.seq is not None:
            return self.seq
        return torch.arange(len(self), dtype=torch.long).unsqueeze(1).expand_as(self.labels).clone()

    def subset(self, idx: torch.Tensor | list[int]) -> TokenRows:
        """Rows ``idx``, in that order."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TokenRows(self.input_ids[idx], self.labels[idx],
                         None if self.private is None else self.private[idx],
                         None if self.seq is None else self.seq[idx])

    def without_private_loss(self) -> TokenRows:
        """The same rows with the private tokens' loss removed (labels -100 there): 'retrain, secrets masked'."""
        if self.private is None:
            return self
        labels = self.labels.masked_fill(self.private, IGNORE)
        return TokenRows(self.input_ids, labels, torch.zeros_like(self.private), self.seq)

    @staticmethod
    def from_blocks(blocks: torch.Tensor, first_seq: int | None = None) -> TokenRows:
        """Contiguous text blocks: every token but the first of a row carries a loss.

        With ``first_seq`` each block is sequence ``first_seq + i`` (ids for methods that key on sequences).
        """
        labels = blocks.long().clone()
        labels[:, 0] = IGNORE
        seq = None
        if first_seq is not None:
            seq = (first_seq + torch.arange(blocks.shape[0], dtype=torch.long)).unsqueeze(1).expand_as(labels).clone()
        return TokenRows(blocks.long(), labels, None, seq)

    @staticmethod
    def cat(parts: list[TokenRows]) -> TokenRows:
        """Rows of several sets stacked (their lengths must agree); missing private/seq tensors are filled.

        A part without ``seq`` gets fresh ids above every id of the parts that have them, one per row.
        """
        widths = {p.input_ids.shape[1] for p in parts}
        if len(widths) != 1:
            raise ValueError(f"cannot stack rows of different lengths {sorted(widths)}")
        private = None
        if any(p.private is not None for p in parts):
            private = torch.cat([p.private_mask() for p in parts])
        seq = None
        if any(p.seq is not None for p in parts):
            nxt = 1 + max(int(p.seq.max()) for p in parts if p.seq is not None and p.seq.numel())
            seqs = []
            for p in parts:
                if p.seq is None:
                    seqs.append(p.seq_ids() + nxt)
                    nxt += len(p)
                else:
                    seqs.append(p.seq)
            seq = torch.cat(seqs)
        return TokenRows(torch.cat([p.input_ids for p in parts]), torch.cat([p.labels for p in parts]), private, seq)


def pad_rows(rows: list[list[int]], pad_id: int, width: int | None = None) -> TokenRows:
    """Right-padded rows (one sequence each); padding carries no loss, the first token neither."""
    if not rows or any(len(r) < 2 for r in rows):
        raise ValueError("need at least one row, each of >= 2 tokens")
    width = width or max(len(r) for r in rows)
    if any(len(r) > width for r in rows):
        raise ValueError(f"a row is longer than width {width}")
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, 1: len(r)] = torch.tensor(r[1:])
    return TokenRows(ids, labels)


def pack_records(records: list[list[int]], block_len: int, pad_id: int) -> TokenRows:
    """Pack whole records (each ``[SEP] + tokens``) into rows of ``block_len``, first-fit in the given order.

    A record is never split across rows; the SEP that opens each record carries no loss (its left
    context differs from row to row), every other record token does.
    """
    too_long = [len(r) for r in records if len(r) > block_len]
    if too_long:
        raise ValueError(f"a record of {max(too_long)} tokens does not fit in block_len={block_len}")
    rows: list[list[int]] = []
    masks: list[list[bool]] = []
    for rec in records:
        if not rows or len(rows[-1]) + len(rec) > block_len:
            rows.append([])
            masks.append([])
        rows[-1].extend(rec)
        masks[-1].extend([False] + [True] * (len(rec) - 1))
    ids = torch.full((len(rows), block_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), block_len), IGNORE, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        t = torch.tensor(r)
        ids[i, : len(r)] = t
        labels[i, : len(r)] = torch.where(torch.tensor(m), t, torch.full_like(t, IGNORE))
    return TokenRows(ids, labels)


def mixture(public: TokenRows, private: TokenRows | None, seed: int, n_private: int = 0) -> TokenRows:
    """Public and private rows shuffled together by ``seed``.

    With ``private=None`` and ``n_private`` the number of private rows of the full mixture, the
    public rows come in the same relative order as in that mixture (so 'retrain without the
    private records' sees the same public data in the same order).
    """
    n_pub = len(public)
    n = n_pub + (len(private) if private is not None else n_private)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if private is None:
        return public.subset(order[order < n_pub])
    return TokenRows.cat([public, private]).subset(order)
