"""Token rows: record encoding behind a separator, padding, packing whole records, and mixtures."""

import random

import pytest
import torch

from libortho.data.records import (
    IGNORE,
    TokenRows,
    encode,
    encode_many,
    mixture,
    pack_records,
    pad_rows,
    record_ids,
    separator_id,
)

# --- encoding -----------------------------------------------------------------------------------


def test_encode_has_no_special_tokens(byte_tokenizer) -> None:
    assert encode(byte_tokenizer, "Hi é") == list("Hi é".encode())
    assert encode(byte_tokenizer, "") == []
    assert encode_many(byte_tokenizer, ["a", "bc"]) == [[97], [98, 99]]
    assert encode_many(byte_tokenizer, []) == []


def test_separator_is_eos_then_bos(byte_tokenizer) -> None:
    assert separator_id(byte_tokenizer) == byte_tokenizer.eos_token_id == 257

    class BosOnly:
        eos_token_id = None
        bos_token_id = 5

    class Neither:
        eos_token_id = None
        bos_token_id = None

    assert separator_id(BosOnly()) == 5
    with pytest.raises(ValueError, match="EOS or BOS"):
        separator_id(Neither())
    with pytest.raises(ValueError, match="EOS or BOS"):
        separator_id(object())


def test_record_ids_prepend_the_separator(byte_tokenizer) -> None:
    texts = ["ab", "", "xyz"]
    assert record_ids(byte_tokenizer, texts) == [[257, 97, 98], [257], [257, 120, 121, 122]]
    assert record_ids(byte_tokenizer, []) == []


# --- TokenRows ----------------------------------------------------------------------------------


def test_token_rows_basics() -> None:
    ids = torch.arange(12).view(3, 4)
    rows = TokenRows.from_blocks(ids)
    assert len(rows) == 3
    # every token but a row's first carries a loss (nothing predicts the first token of a row)
    assert (rows.labels[:, 0] == IGNORE).all() and torch.equal(rows.labels[:, 1:], ids[:, 1:])
    assert rows.labels.data_ptr() != rows.input_ids.data_ptr() and rows.tokens == 9
    sub = rows.subset([2, 0])
    assert torch.equal(sub.input_ids, ids[[2, 0]]) and torch.equal(sub.labels, rows.labels[[2, 0]])
    both = TokenRows.cat([rows, sub])
    assert len(both) == 5 and torch.equal(both.input_ids[3:], sub.input_ids)
    labels = ids.clone()
    labels[:, 0] = IGNORE
    assert TokenRows(ids, labels).tokens == 9


def test_token_rows_validation() -> None:
    with pytest.raises(ValueError, match="must be equal"):
        TokenRows(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="must be equal"):
        TokenRows(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    a = TokenRows.from_blocks(torch.zeros(2, 3, dtype=torch.long))
    b = TokenRows.from_blocks(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="different lengths"):
        TokenRows.cat([a, b])


# --- pad_rows -----------------------------------------------------------------------------------


def test_pad_rows_pads_right_without_loss_on_first_token_or_padding() -> None:
    rows = pad_rows([[9, 1, 2], [9, 3], [9, 4, 5, 6]], pad_id=0)
    assert rows.input_ids.tolist() == [[9, 1, 2, 0], [9, 3, 0, 0], [9, 4, 5, 6]]
    assert rows.labels.tolist() == [[IGNORE, 1, 2, IGNORE], [IGNORE, 3, IGNORE, IGNORE], [IGNORE, 4, 5, 6]]
    assert rows.tokens == 6
    wide = pad_rows([[9, 1]], pad_id=7, width=5)
    assert wide.input_ids.tolist() == [[9, 1, 7, 7, 7]] and wide.labels.tolist() == [[IGNORE, 1] + [IGNORE] * 3]


@pytest.mark.parametrize(("rows", "width", "match"), [
    ([], None, "at least one row"),
    ([[1, 2], [3]], None, ">= 2 tokens"),
    ([[1, 2, 3]], 2, "longer than width"),
])
def test_pad_rows_errors(rows: list, width: int | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pad_rows(rows, pad_id=0, width=width)


# --- pack_records -------------------------------------------------------------------------------


def _random_records(seed: int, n: int, max_len: int, sep: int = 257) -> list[list[int]]:
    rng = random.Random(seed)
    return [[sep] + [rng.randrange(256) for _ in range(rng.randint(0, max_len - 1))] for _ in range(n)]


def _split_rows(packed: TokenRows, sep: int, pad: int) -> list[list[list[int]]]:
    """Each row's records: a record opens at a SEP whose label is -100; the row's tail of pad ids is
    padding (and must carry no loss)."""
    out = []
    for ids, labels in zip(packed.input_ids.tolist(), packed.labels.tolist(), strict=True):
        n_pad = len(ids) - max(i + 1 for i, t in enumerate(ids) if t != pad)
        assert all(lab == IGNORE for lab in labels[len(ids) - n_pad:])
        recs: list[list[int]] = []
        for t, lab in zip(ids[:len(ids) - n_pad], labels, strict=False):
            if lab == IGNORE:
                assert t == sep  # only a record's opening separator carries no loss
                recs.append([t])
            else:
                assert lab == t  # every other record token is its own label
                recs[-1].append(t)
        out.append(recs)
    return out


def test_pack_records_small_known_answer() -> None:
    sep, pad = 0, 0
    recs = [[sep, 1, 2], [sep, 3], [sep, 4, 5, 6], [sep, 7]]
    packed = pack_records(recs, block_len=6, pad_id=pad)
    assert packed.input_ids.tolist() == [[0, 1, 2, 0, 3, 0], [0, 4, 5, 6, 0, 7]]
    assert packed.labels.tolist() == [[IGNORE, 1, 2, IGNORE, 3, IGNORE], [IGNORE, 4, 5, 6, IGNORE, 7]]
    tail = pack_records([[sep, 1, 2, 3], [sep, 4, 5]], block_len=5, pad_id=9)
    assert tail.input_ids.tolist() == [[0, 1, 2, 3, 9], [0, 4, 5, 9, 9]]
    assert tail.labels.tolist() == [[IGNORE, 1, 2, 3, IGNORE], [IGNORE, 4, 5, IGNORE, IGNORE]]


@pytest.mark.parametrize(("seed", "block_len"), [(0, 16), (1, 16), (2, 9)])
def test_pack_records_keeps_records_whole_in_order(seed: int, block_len: int) -> None:
    sep, pad = 257, 258
    recs = _random_records(seed, n=40, max_len=block_len)
    packed = pack_records(recs, block_len, pad_id=pad)
    assert packed.input_ids.shape == (len(packed), block_len)
    rows = _split_rows(packed, sep, pad)
    # records come back whole and in order: none is split across rows
    assert [r for row in rows for r in row] == recs
    assert all(row for row in rows)  # no empty rows
    # first fit in order: the next record never fits in the leftover space of the row before it
    for a, b in zip(rows, rows[1:], strict=False):
        assert sum(map(len, a)) + len(b[0]) > block_len
    # loss on every record token but its separator
    assert packed.tokens == sum(len(r) - 1 for r in recs)


def test_pack_records_exact_fit_and_single_token_records() -> None:
    packed = pack_records([[0, 1, 2, 3], [0, 4, 5, 6]], block_len=4, pad_id=9)
    assert packed.input_ids.tolist() == [[0, 1, 2, 3], [0, 4, 5, 6]]
    only_sep = pack_records([[0], [0], [0]], block_len=2, pad_id=9)
    assert only_sep.input_ids.tolist() == [[0, 0], [0, 9]] and only_sep.tokens == 0


def test_pack_records_refuses_a_record_longer_than_the_block() -> None:
    with pytest.raises(ValueError, match="block_len=4"):
        pack_records([[0, 1], [0, 1, 2, 3, 4]], block_len=4, pad_id=0)


def test_pack_records_of_byte_texts(byte_tokenizer) -> None:
    texts = ["Alma's code is 123456.\n", "Hugo's code is 999.\n", "x"]
    recs = record_ids(byte_tokenizer, texts)
    sep = separator_id(byte_tokenizer)
    packed = pack_records(recs, block_len=32, pad_id=sep)
    flat = [t for row in packed.input_ids.tolist() for t in row]
    decoded = byte_tokenizer.decode(flat)
    assert decoded == "".join(texts)  # the separators and padding are special tokens
    assert packed.tokens == sum(len(t.encode()) for t in texts)


# --- mixture ------------------------------------------------------------------------------------


def _rows(start: int, n: int, width: int = 3) -> TokenRows:
    return TokenRows.from_blocks(torch.arange(start, start + n).view(n, 1).repeat(1, width))


def test_mixture_is_a_seeded_shuffle_of_all_rows() -> None:
    pub, priv = _rows(0, 10), _rows(100, 4)
    a, b, c = mixture(pub, priv, 3), mixture(pub, priv, 3), mixture(pub, priv, 4)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert sorted(a.input_ids[:, 0].tolist()) == list(range(10)) + list(range(100, 104))
    assert torch.equal(a.input_ids[:, 1:], a.labels[:, 1:])  # rows keep their own labels


def test_public_only_mixture_is_a_seeded_permutation_of_the_public_rows() -> None:
    pub = _rows(0, 10)
    a, b = mixture(pub, None, 1), mixture(pub, None, 1)
    assert torch.equal(a.input_ids, b.input_ids)
    assert sorted(a.input_ids[:, 0].tolist()) == list(range(10))


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_public_only_mixture_keeps_the_public_order_of_the_full_mixture(seed: int) -> None:
    pub, priv = _rows(0, 10), _rows(100, 4)
    full = mixture(pub, priv, seed).input_ids[:, 0].tolist()
    public_only = mixture(pub, None, seed, n_private=len(priv)).input_ids[:, 0].tolist()
    assert public_only == [x for x in full if x < 100]
