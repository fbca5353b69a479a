"""Private records: JSONL reading, secret-token spans, packing with private flags and sequence ids."""

from __future__ import annotations

import json

import pytest
import torch

from libortho.data.private import (
    PrivateRecord,
    pack_private_records,
    read_records,
    secret_token_mask,
    write_records,
)
from libortho.data.records import IGNORE, TokenRows
from libortho.models import ByteTokenizer


def test_read_records_round_trip_and_defaults(tmp_path) -> None:
    recs = [PrivateRecord("a code 123 here", "123", id="r1"), PrivateRecord("all of it private"),
            PrivateRecord("public words", private=False)]
    path = write_records(tmp_path / "r.jsonl", recs)
    back = read_records(path)
    assert back == recs
    assert back[0].seq_id == PrivateRecord("other text", id="r1").seq_id  # the id names the record
    assert back[1].seq_id != back[2].seq_id and back[1].seq_id >= 0


@pytest.mark.parametrize("line, needle", [
    ('{"text": "abc", "secret": "zz"}', "substring"),
    ('{"text": "abc", "colour": 1}', "unknown record field"),
    ('{"text": 5}', "'text' must be a string"),
    ('{"text": "abc", "private": "yes"}', "true or false"),
    ('[1, 2]', "JSON object"),
    ('{"text": "abc"', "r.jsonl:2"),
])
def test_bad_record_lines_name_file_line_and_problem(tmp_path, line, needle) -> None:
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match="r.jsonl:2") as err:
        read_records(p)
    assert needle in str(err.value)


def test_empty_or_missing_records_file(tmp_path) -> None:
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no records"):
        read_records(tmp_path / "e.jsonl")
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.jsonl")


def test_byte_tokenizer_marks_exactly_the_secret_bytes_every_occurrence() -> None:
    tok = ByteTokenizer()
    rec = PrivateRecord("pin 4821, again 4821.", "4821")
    mask = secret_token_mask(tok, [rec])[0]
    ids = [tok.eos_token_id, *tok.encode(rec.text, add_special_tokens=False)]
    marked = bytes(t for t, m in zip(ids, mask, strict=True) if m).decode()
    assert marked == "48214821"
    assert mask[0] is False  # the separator is never private


def test_whole_record_private_without_secret_and_public_records_unmarked() -> None:
    tok = ByteTokenizer()
    masks = secret_token_mask(tok, [PrivateRecord("secret all"), PrivateRecord("open", private=False)])
    assert masks[0] == [False] + [True] * len("secret all")
    assert not any(masks[1])


def test_subword_tokenizer_span_covers_the_secret(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    recs = [PrivateRecord("Record: Alma Lockhart. National ID number: 482193004.\nThen more text.", "482193004"),
            PrivateRecord("Directory: e-mail alma.lockhart721@mailbox.example.\n", "alma.lockhart721"),
            PrivateRecord("Account of X. Password: aB3dE9fGh2\nok", "aB3dE9fGh2")]
    for rec, mask in zip(recs, secret_token_mask(tok, recs), strict=True):
        ids = tok(rec.text, add_special_tokens=False)["input_ids"]
        marked = [t for t, m in zip(ids, mask[1:], strict=True) if m]
        text = tok.decode(marked)
        assert rec.secret in text  # covers the secret ...
        assert len(text) <= len(rec.secret) + 2  # ... and little more (a merged space or punctuation)
        assert rec.secret not in tok.decode([t for t, m in zip(ids, mask[1:], strict=True) if not m])


def test_pack_private_records_flags_ids_and_repeats() -> None:
    tok = ByteTokenizer()
    recs = [PrivateRecord("code 11 ok", "11"), PrivateRecord("code 22 ok", "22"), PrivateRecord("plain", private=False)]
    rows = pack_private_records(tok, recs, block_len=32, repeats=[3, 1, 2], seed=1)
    assert rows.private is not None and rows.seq is not None
    assert not bool((rows.private & (rows.labels == IGNORE)).any())
    counts = {r.seq_id: int((rows.seq == r.seq_id).sum()) for r in recs}
    assert counts == {recs[0].seq_id: 3 * 11, recs[1].seq_id: 11, recs[2].seq_id: 2 * 6}  # SEP + text, per copy
    assert rows.private_tokens == 3 * 2 + 2
    pad = rows.seq == -1
    assert bool((rows.labels[pad] == IGNORE).all())
    with pytest.raises(ValueError, match="does not fit"):
        pack_private_records(tok, recs, block_len=5)


def test_tokenrows_cat_fills_ids_and_flags_and_masking_drops_private_loss() -> None:
    pub = TokenRows.from_blocks(torch.arange(12).view(3, 4))
    tok = ByteTokenizer()
    priv = pack_private_records(tok, [PrivateRecord("ab", "b")], block_len=4)
    both = TokenRows.cat([priv, pub])
    assert both.private is not None and both.private[1:].sum() == 0 and both.private_tokens == 1
    assert both.seq is not None and len(set(both.seq[1:, 0].tolist())) == 3
    assert int(both.seq[1:, 0].min()) > int(priv.seq.max())
    masked = both.without_private_loss()
    assert masked.private_tokens == 0 and masked.tokens == both.tokens - 1
    with pytest.raises(ValueError, match="private must be"):
        TokenRows(pub.input_ids, pub.labels, private=torch.zeros(3, 4, dtype=torch.long))
    bad = torch.zeros(3, 4, dtype=torch.bool)
    bad[0, 0] = True  # the first label of a block carries no loss
    with pytest.raises(ValueError, match="carries no loss"):
        TokenRows(pub.input_ids, pub.labels, private=bad)
