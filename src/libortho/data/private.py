"""Private records from users: a JSONL file, token-level secret spans, packing into training rows.

One record a line: ``{"text": ..., "private": true, "secret": S, "id": ...}``. ``secret`` (optional)
is a substring of ``text``: its tokens are the private ones and the rest of the record is public
text that happens to sit around it; without ``secret`` the whole record is private. ``private:
false`` lines are public records (they train the shared weights like any public text); ``id``
(optional, any JSON scalar) names the record, else its text does. Every record is seen as
``[SEP] + tokens(text)`` (:mod:`libortho.data.records`).

Secret tokens are located without character offsets, so any tokenizer works: the secret's
first token is the first token where ``tokens(text)`` departs from ``tokens(text before it)``,
its last is the token where ``tokens(text)`` departs from ``tokens(text up to its end)`` (a token
the secret shares with its neighbours is counted private: the span covers, never undercovers).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from libortho.data.records import IGNORE, TokenRows, common_prefix_len, encode_many, separator_id


@dataclass(frozen=True)
class PrivateRecord:
    """A record: its text, the private secret inside it (None: all of it), whether it is private, an id."""

    text: str
    secret: str | None = None
    private: bool = True
    id: str | None = None

    def __post_init__(self) -> None:
        if not self.text:
            raise ValueError("a record needs non-empty text")
        if self.secret is not None and (not self.secret or self.secret not in self.text):
            raise ValueError(f"secret {self.secret!r} is not a non-empty substring of the record's text")

    @property
    def key(self) -> str:
        """The record's name: its id, else its text."""
        return self.text if self.id is None else self.id

    @property
    def seq_id(self) -> int:
        """A stable non-negative 60-bit integer from :attr:`key` (the same record always gets the same id)."""
        return int(hashlib.sha256(self.key.encode("utf-8")).hexdigest()[:15], 16)


def read_records(path: str | Path) -> list[PrivateRecord]:
    """Records of a JSONL file; a bad line raises ``ValueError`` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"records file {path} not found")
    out = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(_parse_record(json.loads(line)))
            except (json.JSONDecodeError, ValueError, TypeError) as err:
                raise ValueError(f"{path}:{n}: not a valid record: {err}") from err
    if not out:
        raise ValueError(f"{path} holds no records")
    return out


def _parse_record(d: Any) -> PrivateRecord:
    if not isinstance(d, dict):
        raise ValueError("a record is a JSON object with a 'text' field")
    unknown = set(d) - {"text", "secret", "private", "id"}
    if unknown:
        raise ValueError(f"unknown record field(s) {sorted(unknown)} (text, secret, private, id)")
    text, secret, private = d.get("text"), d.get("secret"), d.get("private", True)
    if not isinstance(text, str):
        raise ValueError("'text' must be a string")
    if secret is not None and not isinstance(secret, str):
        raise ValueError("'secret' must be a string")
    if not isinstance(private, bool):
        raise ValueError("'private' must be true or false")
    rid = d.get("id")
    return PrivateRecord(text, secret, private, None if rid is None else str(rid))


def write_records(path: str | Path, records: list[PrivateRecord]) -> Path:
    """Write records as JSONL (atomically)."""
    from libortho.atomic import atomic_write_text

    lines = [json.dumps({k: v for k, v in (("text", r.text), ("secret", r.secret), ("private", r.private),
                                          ("id", r.id)) if v is not None}) for r in records]
    return atomic_write_text(Path(path), "\n".join(lines) + "\n")


def secret_token_mask(tokenizer: Any, records: list[PrivateRecord]) -> list[list[bool]]:
    """Per record, one flag per token of ``[SEP] + tokens(text)``: True where the token is private.

    Non-private records are all False; private records without a secret are all True but the SEP;
    every occurrence of a secret in its text is marked.
    """
    texts = encode_many(tokenizer, [r.text for r in records])
    cuts: list[tuple[int, int, int]] = []  # (record, char start, char end)
    for i, r in enumerate(records):
        if r.private and r.secret is not None:
            start = r.text.find(r.secret)
            while start >= 0:
                cuts.append((i, start, start + len(r.secret)))
                start = r.text.find(r.secret, start + 1)
    heads = encode_many(tokenizer, [records[i].text[:a] for i, a, _ in cuts])
    ends = encode_many(tokenizer, [records[i].text[:b] for i, _, b in cuts])
    masks = [[False] + [r.private and r.secret is None] * len(t) for r, t in zip(records, texts, strict=True)]
    for (i, _a, _b), head, upto in zip(cuts, heads, ends, strict=True):
        t = texts[i]
        lo = common_prefix_len(head, t)
        hi = common_prefix_len(upto, t)
        hi = hi if hi == len(upto) else hi + 1  # the secret's end shares a token with what follows
        for j in range(lo, max(hi, lo + 1)):
            if j < len(t):
                masks[i][j + 1] = True
    return masks


def pack_private_records(tokenizer: Any, records: list[PrivateRecord], block_len: int,
                         repeats: list[int] | None = None, seed: int = 0) -> TokenRows:
    """Training rows of whole records (each ``[SEP] + tokens``, never split), with ``private`` and ``seq``.

    Record i appears ``repeats[i]`` times (default once), in an order shuffled by ``seed``, packed
    first-fit into rows of ``block_len``; the remainder of a row is SEP padding without loss
    (``seq = -1``). Every copy of a record has the record's :attr:`PrivateRecord.seq_id`.
    """
    if not records:
        raise ValueError("no records to pack")
    repeats = [1] * len(records) if repeats is None else list(repeats)
    if len(repeats) != len(records) or any(r < 0 for r in repeats):
        raise ValueError("repeats needs one non-negative count per record")
    sep = separator_id(tokenizer)
    ids = [[sep, *t] for t in encode_many(tokenizer, [r.text for r in records])]
    flags = secret_token_mask(tokenizer, records)
    too_long = [len(x) for x in ids if len(x) > block_len]
    if too_long:
        raise ValueError(f"a record of {max(too_long)} tokens does not fit in block_len={block_len}")
    order = [i for i, n in enumerate(repeats) for _ in range(n)]
    g = torch.Generator().manual_seed(seed)
    order = [order[k] for k in torch.randperm(len(order), generator=g).tolist()]
    rows: list[list[int]] = []
    for i in order:
        if not rows or sum(len(ids[j]) for j in rows[-1]) + len(ids[i]) > block_len:
            rows.append([])
        rows[-1].append(i)
    return _fill_rows(rows, ids, flags, [r.seq_id for r in records], block_len, sep)


def _fill_rows(rows: list[list[int]], ids: list[list[int]], flags: list[list[bool]], seq_ids: list[int],
               block_len: int, sep: int) -> TokenRows:
    """Tensors of packed rows: ids, labels (SEP without loss), private flags and sequence ids."""
    n = len(rows)
    input_ids = torch.full((n, block_len), sep, dtype=torch.long)
    labels = torch.full((n, block_len), IGNORE, dtype=torch.long)
    private = torch.zeros((n, block_len), dtype=torch.bool)
    seq = torch.full((n, block_len), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for i in members:
            k = len(ids[i])
            t = torch.tensor(ids[i])
            input_ids[r, pos:pos + k] = t
            labels[r, pos + 1:pos + k] = t[1:]
            private[r, pos:pos + k] = torch.tensor(flags[i])
            seq[r, pos:pos + k] = seq_ids[i]
            pos += k
    return TokenRows(input_ids, labels, private, seq)
