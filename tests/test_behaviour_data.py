"""The project's behaviour prompt sets (template families never shared across splits, enough held-out
prompts, A and B matched by index) and the JSONL prompt files (errors name file:line, round trip)."""

from __future__ import annotations

import itertools
import json

import pytest

from libortho.data.behaviour import BIRDS, OTHER_ANIMALS, neutral_prompts, planted_prompts, refusal_prompts
from libortho.data.prompts import Prompt, read_prompts, write_prompts

PLANTED_SPLITS = ("finetune", "direction", "validation", "heldout")
REFUSAL_SPLITS = ("direction", "validation", "heldout")


def _template_text(p: Prompt) -> str:
    """The template a prompt was filled from: its subject replaced back out (exactly one occurrence)."""
    assert p.subject and p.text.count(p.subject) == 1, p
    return p.text.replace(p.subject, "{s}")


def _norm(t: str) -> str:
    return " ".join(t.lower().split())


@pytest.mark.parametrize(("make", "splits"), [(planted_prompts, PLANTED_SPLITS), (refusal_prompts, REFUSAL_SPLITS)],
                         ids=["planted", "refusal"])
def test_splits_share_no_template(make, splits) -> None:
    fields, texts = {}, {}
    for split in splits:
        a, b = make(split)
        fields[split] = {p.template for p in a} | {p.template for p in b}
        texts[split] = {_norm(_template_text(p)) for p in a} | {_norm(_template_text(p)) for p in b}
        assert all(p.template for p in a + b)
        # A and B of one split use the same templates
        assert {p.template for p in a} == {p.template for p in b}
        assert {_template_text(p) for p in a} == {_template_text(p) for p in b}
    for s, t in itertools.combinations(splits, 2):
        assert not fields[s] & fields[t], (s, t, fields[s] & fields[t])
        assert not texts[s] & texts[t], (s, t, texts[s] & texts[t])


@pytest.mark.parametrize(("make", "splits"), [(planted_prompts, PLANTED_SPLITS), (refusal_prompts, REFUSAL_SPLITS)],
                         ids=["planted", "refusal"])
def test_a_and_b_are_matched_by_index(make, splits) -> None:
    for split in splits:
        a, b = make(split)
        assert len(a) == len(b) > 0
        for pa, pb in zip(a, b, strict=True):
            assert pa.template == pb.template
            assert _template_text(pa) == _template_text(pb)
            assert pa.subject != pb.subject
        assert len({p.text for p in a}) == len(a) and len({p.text for p in b}) == len(b)  # no duplicates


def test_heldout_has_at_least_200_prompts_in_each_set() -> None:
    for make in (planted_prompts, refusal_prompts):
        a, b = make("heldout")
        assert len(a) >= 200 and len(b) >= 200
    assert len(neutral_prompts("heldout")) >= 200


def test_planted_non_trigger_prompts_never_name_a_bird() -> None:
    for split in PLANTED_SPLITS:
        a, b = planted_prompts(split)
        assert {p.subject for p in a} <= set(BIRDS)
        assert {p.subject for p in b} <= set(OTHER_ANIMALS)
        for p in b:
            words = {w.strip(".,?!'").lower() for w in p.text.split()}
            assert not words & set(BIRDS), p.text


def test_neutral_splits_use_disjoint_subjects() -> None:
    val, held = neutral_prompts("validation"), neutral_prompts("heldout")
    assert val and held
    assert not {p.subject for p in val} & {p.subject for p in held}
    assert not {p.text for p in val} & {p.text for p in held}


def test_unknown_splits_are_refused() -> None:
    with pytest.raises(ValueError):
        planted_prompts("test")
    with pytest.raises(ValueError):
        refusal_prompts("finetune")
    with pytest.raises(ValueError):
        neutral_prompts("direction")


# --- JSONL files -------------------------------------------------------------------------------------------------


def test_read_prompts_names_file_and_line_of_a_bad_line(tmp_path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "fine"}\n\n[1, 2]\n')  # blank line 2 still counts
    with pytest.raises(ValueError) as err:
        read_prompts(f)
    msg = str(err.value)
    assert f"{f}:3" in msg and "\n" not in msg

    f.write_text('{"prompt": "fine"}\n{not json\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: not JSON"):
        read_prompts(f)

    for bad in ('{"prompt": ""}', '{"prompt": 3}', '{"other": "x"}', '"just a string"'):
        f.write_text('{"prompt": "ok"}\n' + bad + "\n")
        with pytest.raises(ValueError, match=r"p\.jsonl:2"):
            read_prompts(f)

    f.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(f)
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "missing.jsonl")


def test_read_prompts_accepts_prompt_instruction_and_text_fields(tmp_path) -> None:
    f = tmp_path / "p.jsonl"
    lines = [{"prompt": "one", "template": "t1", "subject": "s1"}, {"instruction": "two"}, {"text": "three"},
             {"prompt": "four", "extra": 5}]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    got = read_prompts(f)
    assert got == [Prompt("one", "t1", "s1"), Prompt("two"), Prompt("three"), Prompt("four")]


def test_write_then_read_round_trips(tmp_path) -> None:
    prompts = [Prompt("How do \"owls\" sleep?\nTell me.", "animal-heldout:3", "owls"),
               Prompt("caf\u00e9 \u2019x\u2019"), *planted_prompts("validation")[0][:5]]
    path = write_prompts(tmp_path / "out.jsonl", prompts)
    assert read_prompts(path) == prompts
