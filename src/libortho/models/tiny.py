"""Tiny random-init Llama models and a byte-level tokenizer, for tests and the embedded demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus BOS (256), EOS (257) and PAD (258); no merges, no files."""

    vocab_size = 259
    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    bos_token, eos_token, pad_token = "<s>", "</s>", "<pad>"
    padding_side = "left"
    FILE = "byte_tokenizer.json"

    def __len__(self) -> int:
        """Vocabulary size, as ``len(tokenizer)`` gives for Hugging Face tokenizers."""
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = False, add_special_tokens: bool = False, **_: Any) -> list[int]:
        """Token ids of ``text`` (its UTF-8 bytes), optionally after a BOS token."""
        bos = [self.bos_token_id] if (add_bos or add_special_tokens) else []
        return bos + list(text.encode("utf-8"))

    def decode(self, ids: Any, skip_special_tokens: bool = True, **_: Any) -> str:
        """Text of token ids; special tokens are dropped (shown as ``<s>``… unless skipped)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        specials = {self.bos_token_id: self.bos_token, self.eos_token_id: self.eos_token,
                    self.pad_token_id: self.pad_token}
        out, run = [], bytearray()
        for i in (int(x) for x in ids):
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                out.append(specials.get(i, ""))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(self, rows: Any, skip_special_tokens: bool = True, **_: Any) -> list[str]:
        """``decode`` applied to every row."""
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]

    def __call__(self, text: str | list[str], return_tensors: str | None = "pt", **_: Any) -> dict[str, Any]:
        """Encode one text or a batch, left-padded for generation: ``input_ids`` and ``attention_mask``."""
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.encode(t) for t in texts]
        width = max((len(r) for r in rows), default=0)
        ids = [[self.pad_token_id] * (width - len(r)) + r for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids, dtype=torch.long).view(len(rows), width),
                    "attention_mask": torch.tensor(mask, dtype=torch.long).view(len(rows), width)}
        if isinstance(text, str):
            return {"input_ids": ids[0], "attention_mask": mask[0]}
        return {"input_ids": ids, "attention_mask": mask}

    def save_pretrained(self, path: str | Path) -> list[str]:
        """Write the small JSON that identifies this tokenizer; returns the written file."""
        Path(path).mkdir(parents=True, exist_ok=True)
        meta = {"type": "byte", "vocab_size": self.vocab_size, "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}
        out = Path(path, self.FILE)
        out.write_text(json.dumps(meta, indent=2) + "\n")
        return [str(out)]

    @classmethod
    def from_pretrained(cls, path: str | Path, **_: Any) -> ByteTokenizer:
        """Load from a directory written by :meth:`save_pretrained`."""
        f = Path(path, cls.FILE)
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: {path} holds no byte tokenizer")
        meta = json.loads(f.read_text())
        if meta.get("type") != "byte" or meta.get("vocab_size") != cls.vocab_size:
            raise ValueError(f"{f} does not describe a {cls.vocab_size}-token byte tokenizer")
        return cls()


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """A small Llama config sized for :class:`ByteTokenizer` (vocab 259); keyword overrides win."""
    kw: dict[str, Any] = dict(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=160,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=512, bos_token_id=ByteTokenizer.bos_token_id,
                              eos_token_id=ByteTokenizer.eos_token_id, pad_token_id=ByteTokenizer.pad_token_id,
                              tie_word_embeddings=False)
    kw.update(overrides)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # specials that do not fit a smaller vocab
        if key not in overrides and kw[key] >= kw["vocab_size"]:
            kw[key] = None
    return LlamaConfig(**kw)


def build_tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A random-init tiny Llama in eval mode, identical for equal seeds; the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.generation_config.pad_token_id = model.config.pad_token_id
    return model.eval()
