"""Prompt sets for behaviour work: JSONL files, the chat template, left-padded batches.

A prompt set is a list of :class:`Prompt` (the user's text, plus the template family it came from,
so splits can keep direction-finding and evaluation templates apart). Files are JSONL, one object
per line with a ``prompt`` field (``instruction`` and ``text`` are accepted too) and optionally a
``template`` field. :func:`format_prompt` applies the tokenizer's chat template when it has one
(a user turn and the assistant's opening), else uses the text as is. :func:`prompt_batches` yields
left-padded batches with explicit position ids, so the last column is every prompt's last token
and padding changes no position.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TEXT_FIELDS = ("prompt", "instruction", "text")


@dataclass(frozen=True)
class Prompt:
    """One user request and the template family that produced it (``""`` when unknown)."""

    text: str
    template: str = ""
    subject: str = ""


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts of a JSONL file; a line that is not an object with a text field is a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i}: not JSON ({err.msg})") from None
        field = next((f for f in TEXT_FIELDS if isinstance(obj, dict) and isinstance(obj.get(f), str)), None)
        if field is None or not obj[field].strip():
            raise ValueError(f"{path}:{i}: a prompt line is an object with a non-empty "
                             f"{' / '.join(repr(f) for f in TEXT_FIELDS)} string")
        out.append(Prompt(obj[field], str(obj.get("template", "")), str(obj.get("subject", ""))))
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def write_prompts(path: str | Path, prompts: Sequence[Prompt]) -> Path:
    """Write prompts as JSONL (``prompt``, ``template``, ``subject``)."""
    from libortho.atomic import atomic_write_text

    lines = [json.dumps({"prompt": p.text, "template": p.template, "subject": p.subject}) for p in prompts]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, text: str) -> str:
    """The model-ready string: the chat template's user turn and assistant opening, or ``text`` itself."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of :func:`format_prompt` (no extra special tokens: the template carries its own)."""
    return list(tokenizer.encode(format_prompt(tokenizer, text), add_special_tokens=not has_chat_template(tokenizer)))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a bare piece of text (a reply, a phrase), without special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def post_instruction_len(tokenizer: Any) -> int:
    """How many tokens the template puts after the user's text (end of turn, assistant header); 0 without one."""
    if not has_chat_template(tokenizer):
        return 0
    sentinel = "qzqz"
    s = format_prompt(tokenizer, sentinel)
    suffix = s[s.rindex(sentinel) + len(sentinel):]
    return len(encode_text(tokenizer, suffix)) if suffix else 0


def pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded ``input_ids``, ``attention_mask`` and ``position_ids`` (n, T), and the rows' indices."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    index: list[int]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, positions) with every row right-aligned; positions count real tokens from 0."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def prompt_batches(rows: Sequence[Sequence[int]], pad: int, batch_size: int) -> Iterator[PromptBatch]:
    """Left-padded batches of token rows, longest first inside the list order kept by ``index``."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask, pos = left_pad([rows[i] for i in idx], pad)
        yield PromptBatch(ids, mask, pos, idx)
