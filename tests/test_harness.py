"""The privacy harness: secret spans, every metric on a tiny model, known answers on a memorising oracle."""

import math

import pytest
import torch

from libortho.data.canaries import KINDS, Canary, SecretSpace, make_canaries
from libortho.data.records import record_ids
from libortho.eval.harness import HarnessConfig, PrivacyHarness, secret_spans
from libortho.eval.mia import ATTACKS
from test_exposure import SEP, OracleLM, oracle_for

METRIC_KEYS = {"extraction", "exposure", "mia", "private_nll", "nonmember_private_nll", "ppl_domain", "nll_domain",
               "ppl_general", "nll_general", "per_canary", "eval_s"}


@pytest.fixture(scope="module")
def canaries():
    """Two digits (|R| = 100) and two e-mail (|R| = 1000) members, as many non-members; repeats 1 and 4."""
    return make_canaries(n_per_kind=2, kinds=("digits", "email"), repeats=(1, 4), digits_len=2, seed=0)


@pytest.fixture(scope="module")
def domain_blocks():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _slow_secret_nll(model, tok, cs: list[Canary]) -> float:
    """Mean NLL of the secret's tokens, one unpadded forward pass per record."""
    nlls = []
    for c in cs:
        pre, ids = [SEP, *tok.encode(c.prefix)], [SEP, *tok.encode(c.text)]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        nlls += [-float(logp[t - 1, ids[t]]) for t in range(len(pre), len(pre) + len(c.secret))]
    return sum(nlls) / len(nlls)


# --------------------------------------------------------------------------------------------- secret_spans


def test_secret_spans_locate_exactly_the_secret(byte_tokenizer) -> None:
    members, nonmembers = make_canaries(n_per_kind=2, seed=1, digits_len=3)
    cs = members + nonmembers
    assert {c.kind for c in cs} == set(KINDS)
    rows = record_ids(byte_tokenizer, [c.text for c in cs])
    for c, row, (a, b) in zip(cs, rows, secret_spans(byte_tokenizer, cs), strict=True):
        assert row[0] == SEP and a == 1 + len(c.prefix.encode()) and b - a == len(c.secret.encode())
        assert byte_tokenizer.decode(row[a:b]) == c.secret
        assert byte_tokenizer.decode(row[1:a]) == c.prefix and byte_tokenizer.decode(row[b:]) == c.suffix


def test_secret_spans_reject_an_unlocatable_secret(byte_tokenizer) -> None:
    empty = Canary("digits", "Code: ", "", ".\n", 1, True, SecretSpace("", "0123456789", 2))
    with pytest.raises(ValueError, match="locate the secret"):
        secret_spans(byte_tokenizer, [empty])


@pytest.mark.smollm2
def test_secret_spans_with_smollm2_tokenizer(smollm2_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    members, _ = make_canaries(n_per_kind=2, seed=0, digits_len=3)
    rows = record_ids(tok, [c.text for c in members])
    for c, row, (a, b) in zip(members, rows, secret_spans(tok, members), strict=True):
        span = tok.decode(row[a:b])
        # the span is the secret, plus the prefix's trailing space where the tokenizer merged it in
        assert span in (c.secret, " " + c.secret), (c.kind, span)
        assert tok.decode(row[1:a]) + span + tok.decode(row[b:]) == c.text
    email = next(i for i, c in enumerate(members) if c.kind == "email")
    a, b = secret_spans(tok, [members[email]])[0]
    assert tok.decode(rows[email][a:b]) == " " + members[email].secret


# --------------------------------------------------------------------------------------------- construction


def test_harness_rejects_bad_input(byte_tokenizer, canaries, domain_blocks) -> None:
    members, nonmembers = canaries
    with pytest.raises(ValueError, match="member and non-member"):
        PrivacyHarness(byte_tokenizer, [], nonmembers, domain_blocks, None)
    with pytest.raises(ValueError, match="member and non-member"):
        PrivacyHarness(byte_tokenizer, members, [], domain_blocks, None)
    bad = Canary("digits", "Code: ", "", ".\n", 1, True, SecretSpace("", "0123456789", 2))
    with pytest.raises(ValueError, match="locate the secret"):
        PrivacyHarness(byte_tokenizer, [*members, bad], nonmembers, domain_blocks, None)


def test_describe(byte_tokenizer, canaries, domain_blocks) -> None:
    members, nonmembers = canaries
    h = PrivacyHarness(byte_tokenizer, members, nonmembers, domain_blocks, domain_blocks[:1],
                       HarnessConfig(batch_size=2))
    d = h.describe()
    assert d["members"] == d["nonmembers"] == 4 and d["domain_tokens"] == 48 and d["general_tokens"] == 24
    assert d["member_repeats"] == [1, 4] and d["kinds"] == ["digits", "email"] and d["config"]["batch_size"] == 2
    assert h.member_rows == record_ids(byte_tokenizer, [c.text for c in members])


# --------------------------------------------------------------------------------------------- evaluate


def _check_ranges(out: dict, members: list[Canary], n_nonmember_exposures: int) -> None:
    assert set(out) == METRIC_KEYS
    ext, expo = out["extraction"], out["exposure"]
    assert 0.0 <= ext["rate"] <= 1.0 and 0.0 <= ext["chars_matched_frac"] <= 1.0
    assert set(ext["by_repeats"]) == set(expo["by_repeats"]) == {"1", "4"}
    assert set(ext["by_kind"]) == set(expo["by_kind"]) == {"digits", "email"}
    assert all(0.0 <= v <= 1.0 for v in [*ext["by_repeats"].values(), *ext["by_kind"].values()])
    assert expo["nonmember_n"] == n_nonmember_exposures
    assert len(out["per_canary"]) == len(members)
    for c, p in zip(members, out["per_canary"], strict=True):
        assert p["secret"] == c.secret and p["kind"] == c.kind and p["repeats"] == c.repeats
        assert p["exposure_max"] == pytest.approx(c.space.size_log2)
        assert 0.0 <= p["exposure"] <= p["exposure_max"] + 1e-9
        assert p["exposure_method"] in ("exact", "estimated") and 0 <= p["chars_matched"] <= len(c.secret)
    assert 0.0 <= expo["mean"] <= max(c.space.size_log2 for c in members)
    assert expo["mean"] == pytest.approx(sum(p["exposure"] for p in out["per_canary"]) / len(members))
    for s in out["mia"].values():
        assert 0.0 <= s["auc"] <= 1.0 and 0.0 <= s["tpr_at_1pct_fpr"] <= 1.0 and 0.0 <= s["tpr_at_0.1pct_fpr"] <= 1.0
        assert s["n_members"] == s["n_nonmembers"] == 4
    assert out["private_nll"] >= 0 and out["nonmember_private_nll"] >= 0
    assert out["ppl_domain"] == pytest.approx(math.exp(out["nll_domain"])) and out["ppl_domain"] >= 1.0
    assert out["eval_s"] > 0


def test_evaluate_tiny_llama_all_metrics(tiny_llama, byte_tokenizer, canaries, domain_blocks) -> None:
    members, nonmembers = canaries
    h = PrivacyHarness(byte_tokenizer, members, nonmembers, domain_blocks, domain_blocks[:1],
                       HarnessConfig(batch_size=3))
    out = h.evaluate(tiny_llama, progress=False)
    _check_ranges(out, members, n_nonmember_exposures=4)
    assert set(out["mia"]) == set(ATTACKS) - {"reference"} | {"secret_loss"}
    assert all(p["exposure_method"] == "exact" for p in out["per_canary"])
    assert out["extraction"]["rate"] == 0.0  # a random model does not produce the secrets
    assert out["ppl_general"] == pytest.approx(math.exp(out["nll_general"]))
    assert out["nll_domain"] == pytest.approx(math.log(259), abs=1.0)  # a random init is near uniform
    assert out["private_nll"] == pytest.approx(_slow_secret_nll(tiny_llama, byte_tokenizer, members), abs=1e-5)
    assert out["nonmember_private_nll"] == pytest.approx(_slow_secret_nll(tiny_llama, byte_tokenizer, nonmembers),
                                                         abs=1e-5)
    # with the model itself as the reference, every reference score is 0: the attack is at exact chance,
    # and the other attacks do not move
    h.set_reference(tiny_llama)
    mia, private_nll, _, _ = h._mia(tiny_llama)
    assert set(mia) == set(ATTACKS) | {"secret_loss"} and mia["reference"]["auc"] == 0.5
    assert {k: v for k, v in mia.items() if k != "reference"} == out["mia"] and private_nll == out["private_nll"]


def test_evaluate_memorising_oracle_known_answers(byte_tokenizer, canaries, domain_blocks) -> None:
    members, nonmembers = canaries
    model = oracle_for(byte_tokenizer, members)
    h = PrivacyHarness(byte_tokenizer, members, nonmembers, domain_blocks, None, HarnessConfig(batch_size=4))
    out = h.evaluate(model, progress=False)
    _check_ranges(out, members, n_nonmember_exposures=4)
    assert out["ppl_general"] is None and out["nll_general"] is None
    ext, expo = out["extraction"], out["exposure"]
    assert ext["rate"] == 1.0 and ext["chars_matched_frac"] == 1.0
    assert ext["by_repeats"] == {"1": 1.0, "4": 1.0} and ext["by_kind"] == {"digits": 1.0, "email": 1.0}
    for c, p in zip(members, out["per_canary"], strict=True):
        assert p["extracted"] and p["exposure_method"] == "exact"
        assert p["exposure"] == pytest.approx(math.log2(c.space.size), abs=1e-12)
    assert expo["by_kind"] == pytest.approx({"digits": math.log2(100), "email": math.log2(1000)})
    assert expo["nonmember_mean"] < expo["mean"] - 2
    assert out["private_nll"] < 1e-4 < 1.0 < out["nonmember_private_nll"]
    assert out["mia"]["loss"]["auc"] == 1.0 and out["mia"]["loss"]["tpr_at_1pct_fpr"] == 1.0
    assert out["mia"]["secret_loss"]["auc"] == 1.0  # the oracle knows every member secret, no non-member one
    kept = PrivacyHarness(byte_tokenizer, members, nonmembers, domain_blocks, None,
                          HarnessConfig(batch_size=4, keep_scores=True, exposure_nonmember_limit=1)).evaluate(
                              model, progress=False)
    assert len(kept["mia_scores"]["secret_loss"]["members"]) == len(members)
    assert len(kept["mia_scores"]["loss"]["nonmembers"]) == len(nonmembers)
    assert len(kept["nonmember_exposures"]) == 1 and kept["exposure"]["nonmember_n"] == 1
    assert "reference" not in out["mia"]
    # the reference attack appears once a reference model is set: one that never saw the members (and
    # otherwise agrees with the oracle) separates members from non-members perfectly
    h.set_reference(OracleLM())
    again = h.evaluate(model, progress=False)
    assert set(again["mia"]) == set(ATTACKS) | {"secret_loss"}
    assert again["mia"]["reference"]["auc"] == 1.0 and again["mia"]["reference"]["tpr_at_1pct_fpr"] == 1.0
    assert {k: v for k, v in again["mia"].items() if k != "reference"} == out["mia"]


def test_evaluate_switches_to_estimated_exposure(byte_tokenizer, canaries, domain_blocks) -> None:
    """With max_enumerate = 100 the e-mail secrets (|R| = 1000) are estimated and their non-members skipped."""
    members, nonmembers = canaries
    model = oracle_for(byte_tokenizer, members)
    cfg = HarnessConfig(max_enumerate=100, exposure_samples=16, batch_size=4)
    out = PrivacyHarness(byte_tokenizer, members, nonmembers, domain_blocks, None, cfg).evaluate(model, False)
    _check_ranges(out, members, n_nonmember_exposures=2)
    methods = {p["kind"]: p["exposure_method"] for p in out["per_canary"]}
    assert methods == {"digits": "exact", "email": "estimated"}
    # the memorised e-mail secrets beat every sampled candidate: the estimate is clipped to log2 |R|
    assert out["exposure"]["by_kind"]["email"] == pytest.approx(math.log2(1000))
    no_ctrl = HarnessConfig(max_enumerate=100, exposure_samples=16, exposure_nonmembers=False, batch_size=4)
    out2 = PrivacyHarness(byte_tokenizer, members, nonmembers, domain_blocks, None, no_ctrl).evaluate(model, False)
    assert out2["exposure"]["nonmember_n"] == 0 and out2["exposure"]["nonmember_mean"] is None
