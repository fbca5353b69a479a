"""Tiny random-init Llama models and a byte-level tokenizer, for tests and the embedded demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """A small Llama config (vocab 259 = 256 bytes + BOS/EOS/PAD); keyword overrides win."""
    kw: dict[str, Any] = dict(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=160,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=512, bos_token_id=ByteTokenizer.bos_token_id,
                              eos_token_id=ByteTokenizer.eos_token_id, pad_token_id=ByteTokenizer.pad_token_id,
                              tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A deterministic random-init tiny Llama in eval mode."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.eval()


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus BOS (256), EOS (257) and PAD (258)."""

    vocab_size = 259
    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    FILE = "byte_tokenizer.json"

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return ([self.bos_token_id] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __call__(self, text: str | list[str], return_tensors: str | None = "pt", **_: Any) -> dict:
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.encode(t) for t in texts]
        width = max(len(r) for r in rows)
        ids = [[self.pad_token_id] * (width - len(r)) + r for r in rows]  # left padding for generation
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

    def save_pretrained(self, path: str | Path) -> None:
        Path(path, self.FILE).write_text(json.dumps({"type": "byte", "vocab_size": self.vocab_size}))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ByteTokenizer:
        meta = json.loads(Path(path, cls.FILE).read_text())
        if meta.get("type") != "byte":
            raise ValueError(f"{path} does not hold a byte tokenizer")
        return cls()
