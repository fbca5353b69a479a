"""Corpora loaders, the train / held-out split and token blocks."""

import pytest
import torch

from libortho.data import (
    calibration_blocks,
    fortune_texts,
    load_corpus,
    shakespeare_texts,
    split_documents,
    token_blocks,
    tokenize_stream,
)
from libortho.data.corpora import strip_play_markdown


def _docs(n: int, length: int = 300) -> list[str]:
    """``n`` distinct synthetic documents; every line names its document so overlaps are visible."""
    return [" ".join(f"doc{i:03d}-w{j}" for j in range(length // 10)) for i in range(n)]


@pytest.fixture(scope="module")
def plays() -> dict[str, str]:
    return shakespeare_texts()


def test_split_is_disjoint_deterministic_and_complete() -> None:
    docs = _docs(40)
    s = split_documents(docs, seed=0, held_out_fraction=0.1)
    assert len(s["heldout"]) == 4 and len(s["train"]) == 36
    assert not set(s["train"]) & set(s["heldout"]) and set(s["train"]) | set(s["heldout"]) == set(docs)
    assert split_documents(docs, seed=0) == s
    assert split_documents(docs, seed=1)["heldout"] != s["heldout"]


def test_single_document_splits_into_two_contiguous_ranges() -> None:
    text = "\n".join(f"line {i:05d} of the only document" for i in range(2000))
    s = split_documents([text], seed=0, held_out_fraction=0.1)
    (train,), (held,) = s["train"], s["heldout"]
    assert train + held == text and train.endswith("\n")  # cut at a line break, nothing lost or shared
    assert abs(len(held) - 0.1 * len(text)) < 0.02 * len(text)
    assert split_documents([text], seed=5) == s
    with pytest.raises(ValueError, match="too short"):
        split_documents(["x"])


def test_token_blocks_shapes_determinism_and_split_disjointness(byte_tokenizer) -> None:
    docs = _docs(30, length=600)
    kw = dict(tokenizer=byte_tokenizer, block_len=64)
    a = token_blocks(docs, n_blocks=20, seed=0, **kw)
    assert a.shape == (20, 64) and a.dtype == torch.long
    assert torch.equal(a, token_blocks(docs, n_blocks=20, seed=0, **kw))
    assert not torch.equal(a, token_blocks(docs, n_blocks=20, seed=1, **kw))
    assert len({tuple(r) for r in a.tolist()}) == 20  # non-overlapping blocks, no repeats
    held = token_blocks(docs, n_blocks=None, seed=5, split="heldout", **kw)  # any sampling seed
    train_text = byte_tokenizer.decode(token_blocks(docs, n_blocks=None, seed=7, **kw).flatten())
    held_text = byte_tokenizer.decode(held.flatten())
    train_docs = {w.split("-")[0] for w in train_text.split()}
    held_docs = {w.split("-")[0] for w in held_text.split()}
    assert held_docs and not {d for d in held_docs if len(d) == 6} & {d for d in train_docs if len(d) == 6}


def test_tokenize_stream_puts_eos_between_documents(byte_tokenizer) -> None:
    ids = tokenize_stream(["ab", "c"], byte_tokenizer)
    assert ids == [97, 98, byte_tokenizer.eos_token_id, 99, byte_tokenizer.eos_token_id]


def test_too_small_corpus_and_bad_arguments_are_refused(byte_tokenizer) -> None:
    docs = _docs(10, length=100)
    with pytest.raises(ValueError, match="corpus too small"):
        token_blocks(docs, byte_tokenizer, block_len=64, n_blocks=1000, seed=0)
    with pytest.raises(ValueError, match="corpus too small"):
        token_blocks(docs, byte_tokenizer, block_len=10_000, n_blocks=None, seed=0, split="heldout")
    with pytest.raises(ValueError, match="split"):
        token_blocks(docs, byte_tokenizer, block_len=8, n_blocks=1, seed=0, split="test")
    with pytest.raises(ValueError, match="empty"):
        token_blocks(["", "  "], byte_tokenizer, block_len=8, n_blocks=1, seed=0)
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_documents(docs, held_out_fraction=1.0)


def test_calibration_blocks_mix_sources_equally(tmp_path, byte_tokenizer) -> None:
    for name, letter in (("a.txt", "x"), ("b.txt", "y")):
        (tmp_path / name).write_text("\n".join(letter * 40 for _ in range(400)))
    out = calibration_blocks([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], byte_tokenizer,
                             n_blocks=9, block_len=32, seed=0)
    assert out.shape == (9, 32)
    n_x = sum(1 for r in out.tolist() if ord("x") in r)
    assert n_x == 5  # 9 = 5 + 4, first source gets the remainder
    again = calibration_blocks([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], byte_tokenizer, 9, 32, seed=0)
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="no calibration sources"):
        calibration_blocks([], byte_tokenizer, 4, 32)


def test_load_corpus_from_files_and_directories(tmp_path) -> None:
    (tmp_path / "one.txt").write_text("first")
    (tmp_path / "two.txt").write_text("second")
    assert load_corpus(tmp_path / "one.txt") == ["first"]
    assert load_corpus(tmp_path) == ["first", "second"]
    with pytest.raises(FileNotFoundError, match="unknown corpus"):
        load_corpus("no-such-corpus")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt"):
        load_corpus(empty)


def test_strip_play_markdown() -> None:
    md = "# Hamlet\n\n## ACT I\n\n_Enter HAMLET_\n\n**HAMLET**  \nTo be, or not  \nto be\\--that.\n__\\[Aside]_  \n"
    want = "Hamlet\n\nACT I\n\nEnter HAMLET\n\nHAMLET:\nTo be, or not\nto be--that.\n[Aside]\n"
    assert strip_play_markdown(md) == want


def test_shakespeare_loader_is_plain_text(plays) -> None:
    assert len(plays) >= 30 and "hamlet" in plays and list(plays) == sorted(plays)
    text = plays["hamlet"]
    assert len(text) > 100_000 and "HAMLET:" in text and "To be, or not to be" in text
    for play in plays.values():
        assert not any(c in play for c in "*_#\\")
        assert not any(line.endswith(" ") for line in play.splitlines())
    assert load_corpus("shakespeare") == list(plays.values())


def test_shakespeare_blocks_with_byte_tokenizer(plays, byte_tokenizer) -> None:
    docs = list(plays.values())
    blocks = token_blocks(docs, byte_tokenizer, block_len=128, n_blocks=8, seed=0, split="heldout")
    assert blocks.shape == (8, 128) and int(blocks.max()) < byte_tokenizer.vocab_size


@pytest.mark.fortunes
def test_fortunes_loader(fortunes_dir) -> None:
    fortunes = fortune_texts(fortunes_dir)
    assert len(fortunes) > 1000
    assert all(f.strip() == f and f for f in fortunes)
    assert not any("\x08" in f or "\n%\n" in f for f in fortunes)
    assert fortunes == load_corpus("fortunes")


def test_fortunes_missing_gives_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="fortunes"):
        fortune_texts(tmp_path / "absent")
    (tmp_path / "jokes").write_text("one\n%\ntwo\nlines\n%\n")
    (tmp_path / "jokes.dat").write_bytes(b"\0\1")
    (tmp_path / "off").mkdir()
    (tmp_path / "off" / "rude").write_text("no\n%\n")
    assert fortune_texts(tmp_path) == ["one", "two\nlines"]
