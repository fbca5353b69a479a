"""Token blocks for calibration and evaluation, with a deterministic train / held-out split."""

from __future__ import annotations

import random
from typing import Any

import torch

SPLITS = ("train", "heldout")


def split_documents(docs: list[str], seed: int, held_out_fraction: float = 0.1) -> dict[str, list[str]]:
    """Split by document (several docs) or by contiguous character range (one doc); never overlapping."""
    if not docs:
        raise ValueError("corpus is empty")
    if not 0 < held_out_fraction < 1:
        raise ValueError("held_out_fraction must be in (0, 1)")
    if len(docs) == 1:
        text = docs[0]
        cut = int(len(text) * (1 - held_out_fraction))
        return {"train": [text[:cut]], "heldout": [text[cut:]]}
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(docs) * held_out_fraction))
    held = set(order[:n_held])
    return {"train": [d for i, d in enumerate(docs) if i not in held],
            "heldout": [d for i, d in enumerate(docs) if i in held]}


def _encode(tokenizer: Any, text: str) -> list[int]:
    enc = tokenizer.encode(text) if hasattr(tokenizer, "encode") else tokenizer(text)["input_ids"]
    return list(enc.ids if hasattr(enc, "ids") else enc)


def tokenize_stream(docs: list[str], tokenizer: Any) -> list[int]:
    """All documents tokenized and joined with EOS between them."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for d in docs:
        ids.extend(_encode(tokenizer, d))
        if eos is not None:
            ids.append(int(eos))
    return ids


def token_blocks(docs: list[str], tokenizer: Any, block_len: int, n_blocks: int | None, seed: int,
                 split: str = "train", held_out_fraction: float = 0.1) -> torch.Tensor:
    """``(n_blocks, block_len)`` non-overlapping token blocks from one split, sampled by seed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if block_len < 2:
        raise ValueError("block_len must be >= 2")
    ids = tokenize_stream(split_documents(docs, seed, held_out_fraction)[split], tokenizer)
    available = len(ids) // block_len
    if n_blocks is None:
        n_blocks = available
    if n_blocks > available or n_blocks < 1:
        raise ValueError(f"the {split} split has {len(ids)} tokens = {available} blocks of {block_len}; "
                         f"{n_blocks} requested")
    starts = sorted(random.Random(seed + 1).sample(range(available), n_blocks))
    t = torch.tensor(ids[: available * block_len], dtype=torch.long).view(available, block_len)
    return t[starts].clone()


def calibration_blocks(sources: list[str], tokenizer: Any, n_blocks: int, block_len: int, seed: int = 0,
                       split: str = "train") -> torch.Tensor:
    """Calibration blocks drawn equally from several corpora (a mix generalises better than one)."""
    from libortho.data.corpora import load_corpus

    if not sources:
        raise ValueError("no calibration sources given")
    share = [n_blocks // len(sources) + (1 if i < n_blocks % len(sources) else 0) for i in range(len(sources))]
    parts = [token_blocks(load_corpus(s), tokenizer, block_len, k, seed, split) for s, k in zip(sources, share,
                                                                                              strict=True) if k]
    out = torch.cat(parts)
    return out[torch.randperm(out.shape[0], generator=torch.Generator().manual_seed(seed))]
