"""Token blocks for calibration and evaluation, with a deterministic train / held-out split.

The split is made on text before tokenization, so whatever the tokenizer the two sides never
share a document: several documents are split by document (a seeded shuffle), a single document
into two contiguous ranges (the last ``held_out_fraction`` of it, cut at a line break, is held
out). The split has its own ``split_seed`` (default 0), separate from the ``seed`` that samples
blocks, so calibration drawn with any seed never overlaps evaluation drawn with any other.
"""

from __future__ import annotations

import random
from typing import Any

import torch

SPLITS = ("train", "heldout")


def _check_fraction(held_out_fraction: float) -> None:
    """Refuse a held-out fraction outside (0, 1)."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")


def _tail_cut(text: str, held_out_fraction: float) -> int:
    """Where the held-out tail of a single document starts: at a line break near the target, if any."""
    want = int(len(text) * (1 - held_out_fraction))
    nl = text.find("\n", want)
    return nl + 1 if 0 <= nl < want + max(1, len(text) // 100) else want


def split_documents(docs: list[str], seed: int = 0, held_out_fraction: float = 0.1) -> dict[str, list[str]]:
    """``{"train": [...], "heldout": [...]}``: disjoint, deterministic given ``seed``; order preserved."""
    _check_fraction(held_out_fraction)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError("corpus is empty: no non-blank documents")
    if len(docs) == 1:
        cut = _tail_cut(docs[0], held_out_fraction)
        if not docs[0][:cut].strip() or not docs[0][cut:].strip():
            raise ValueError("the single document is too short to split into train and held-out parts")
        return {"train": [docs[0][:cut]], "heldout": [docs[0][cut:]]}
    n_held = min(len(docs) - 1, max(1, round(len(docs) * held_out_fraction)))
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_held])
    return {"train": [d for i, d in enumerate(docs) if i not in held],
            "heldout": [d for i, d in enumerate(docs) if i in held]}


def _encode_many(tokenizer: Any, docs: list[str]) -> list[list[int]]:
    """Token ids of each document without special tokens (batched for Hugging Face tokenizers)."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return [list(r) for r in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]]
    out = []
    for d in docs:
        enc = tokenizer.encode(d, add_special_tokens=False)
        out.append(list(enc.ids if hasattr(enc, "ids") else enc))
    return out


def tokenize_stream(docs: list[str], tokenizer: Any) -> list[int]:
    """All documents tokenized and joined, with the tokenizer's EOS after each one (when it has one)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for row in _encode_many(tokenizer, docs):
        ids.extend(int(t) for t in row)
        if eos is not None:
            ids.append(int(eos))
    return ids


def token_blocks(docs: list[str], tokenizer: Any, block_len: int, n_blocks: int | None, seed: int = 0,
                 split: str = "train", held_out_fraction: float = 0.1, split_seed: int = 0) -> torch.Tensor:
    """``(n_blocks, block_len)`` int64 non-overlapping token blocks of one split, sampled by ``seed``.

    ``n_blocks=None`` returns every block of the split in order.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if block_len < 2:
        raise ValueError(f"block_len must be >= 2, got {block_len}")
    if n_blocks is not None and n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1 (or None for all), got {n_blocks}")
    ids = tokenize_stream(split_documents(docs, split_seed, held_out_fraction)[split], tokenizer)
    available = len(ids) // block_len
    if available == 0 or (n_blocks is not None and n_blocks > available):
        raise ValueError(f"corpus too small: the {split} split has {len(ids)} tokens = {available} blocks of "
                         f"{block_len}, but {n_blocks if n_blocks is not None else 'at least 1'} were requested")
    grid = torch.tensor(ids[: available * block_len], dtype=torch.long).view(available, block_len)
    if n_blocks is None:
        return grid
    rows = sorted(random.Random(seed).sample(range(available), n_blocks))
    return grid[rows].clone()


def whole_text_blocks(docs: list[str], tokenizer: Any, block_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every token of ``docs`` (a user's own text, not split), as consecutive blocks in order.

    Returns ``(full, tail)``: ``full`` is ``(n, block_len)`` (``n`` may be 0) and ``tail`` the last
    partial block ``(1, r)`` when it holds ``r >= 2`` tokens (one token predicts nothing), else None.
    Documents are joined with the tokenizer's EOS between them, not after the last one (the end of
    the file is not text to predict).
    """
    if block_len < 2:
        raise ValueError(f"block_len must be >= 2, got {block_len}")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError("the text is empty: nothing to score")
    ids = tokenize_stream(docs, tokenizer)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids = ids[:-1]
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s): at least 2 are needed to score one prediction")
    n_full = len(ids) // block_len
    full = torch.tensor(ids[: n_full * block_len], dtype=torch.long).view(n_full, block_len)
    rest = ids[n_full * block_len:]
    tail = torch.tensor(rest, dtype=torch.long).view(1, -1) if len(rest) >= 2 else None
    return full, tail


def _shares(n_blocks: int, k: int) -> list[int]:
    """``n_blocks`` split into ``k`` near-equal integer parts (the first ones get the remainder)."""
    return [n_blocks // k + (1 if i < n_blocks % k else 0) for i in range(k)]


def calibration_blocks(sources: list[str], tokenizer: Any, n_blocks: int, block_len: int, seed: int = 0,
                       split: str = "train", held_out_fraction: float = 0.1, split_seed: int = 0) -> torch.Tensor:
    """Calibration blocks drawn equally from several corpora and shuffled (a mix generalises better)."""
    from libortho.data.corpora import load_corpus

    if not sources:
        raise ValueError("no calibration sources given")
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    parts = [token_blocks(load_corpus(src), tokenizer, block_len, k, seed=seed + i, split=split,
                          held_out_fraction=held_out_fraction, split_seed=split_seed)
             for i, (src, k) in enumerate(zip(sources, _shares(n_blocks, len(sources)), strict=True)) if k]
    out = torch.cat(parts)
    return out[torch.randperm(out.shape[0], generator=torch.Generator().manual_seed(seed))]
