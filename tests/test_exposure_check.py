"""The exposure check (``experiments/exposure_check.py``): restricted canaries, the char-wise Luhn
enumeration, the sample the lookup re-uses, the error statistics on known inputs, and a tiny end-to-end
run that resumes from its cache and renders its report."""

import json
import math
import string
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from libortho.data.canaries import ALNUM, luhn_valid, make_canaries
from libortho.data.records import record_ids
from libortho.eval.exposure import (
    candidate_scores,
    empirical_exposure,
    estimated_exposure,
    exact_exposure,
    sample_candidates,
    skewnorm_exposure,
)
from libortho.experiments import exposure_check as ec
from libortho.experiments import exposure_stats as st
from libortho.experiments.config import preset
from libortho.experiments.store import load_saved_model
from libortho.train.loop import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import exposure_check as bench_cli  # noqa: E402
import exposure_check_render as render_mod  # noqa: E402

TINY = ec.ExposureCheckConfig(model="tiny", n_per_kind=1, digit_free=3, password_free=1, public_blocks=4,
                              finetune=TrainConfig(lr=1e-3, steps=2, batch_size=4), n_samples=16,
                              extra_sample_sizes=(32,), n_seeds=3, direct_seeds=1, n_boot=50)


def test_default_sample_size_is_the_production_one() -> None:
    assert ec.ExposureCheckConfig().n_samples == preset("smollm2-135m").harness.exposure_samples


# --------------------------------------------------------------------------------------------- canaries


def test_restricted_canaries_keep_each_kind_template() -> None:
    cfg = ec.ExposureCheckConfig(n_per_kind=2, repeats=(1, 16))
    members, nonmembers = ec.build_canaries(cfg)
    gen_m, gen_n = make_canaries(2, cfg.kinds, cfg.repeats, cfg.seed, cfg.digit_free)
    length = {"id": 9, "phone": 10, "card": 16, "digits": 4, "password": 10}
    for got, gen in zip(members + nonmembers, gen_m + gen_n, strict=True):
        sp = got.space
        assert sp.contains(got.secret) and got.text == got.prefix + got.secret + got.suffix
        assert got.prefix == gen.prefix and got.kind == gen.kind and got.repeats == gen.repeats
        if got.kind == "password":
            assert sp.size == 62 ** 2 and sp.alphabet == ALNUM
        else:
            assert sp.size == 10 ** 4 and sp.alphabet == string.digits
        if got.kind == "email":  # the generator's three digits plus one more
            assert got.secret[:-1] == gen.secret and got.secret[-1].isdigit()
        else:  # the very secret the generator drew, only the candidate space is narrower
            assert got.secret == gen.secret and len(got.secret) == length[got.kind]
        if got.kind == "card":
            assert sp.luhn and luhn_valid(got.secret)
    assert [c.repeats for c in members] == [1, 16] * len(cfg.kinds) and {c.repeats for c in nonmembers} == {0}
    secrets = [c.secret for c in members + nonmembers]
    assert len(set(secrets)) == len(secrets)


def test_restrict_moves_free_characters_into_the_head() -> None:
    members, _ = make_canaries(1, ("card",), seed=4)
    card = members[0]
    narrow = ec.restrict(card, 3, None)
    assert narrow.secret == card.secret and narrow.space.n_free == 3 and narrow.space.head == card.secret[:12]
    assert narrow.space.free_part(narrow.secret) == card.secret[12:15]


# --------------------------------------------------------------------------------------------- Luhn enumeration


@torch.no_grad()
def _slow_scores(model, tok, canary) -> torch.Tensor:
    """log p(free characters + check digit | SEP + prefix + head) of every candidate, full forward passes."""
    start = len(record_ids(tok, [canary.prefix + canary.space.head])[0])
    out = []
    for secret in canary.space.enumerate():
        ids = record_ids(tok, [canary.prefix + secret])[0]
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        out.append(sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids))))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(("n_free", "batch"), [(2, 3), (3, 7)])
def test_luhn_scores_match_a_slow_reference_and_the_library(tiny_llama, byte_tokenizer, n_free, batch) -> None:
    members, _ = make_canaries(1, ("card",), seed=2)
    card = ec.restrict(members[0], n_free, None)
    fast = ec.luhn_candidate_scores(tiny_llama, byte_tokenizer, card, batch_size=batch)
    torch.testing.assert_close(fast, candidate_scores(tiny_llama, byte_tokenizer, card), atol=1e-5, rtol=0)
    if n_free == 2:
        torch.testing.assert_close(fast, _slow_scores(tiny_llama, byte_tokenizer, card), atol=1e-4, rtol=0)
    digits = ec.restrict(make_canaries(1, ("digits",), seed=2)[0][0], 2, None)
    assert ec.luhn_candidate_scores(tiny_llama, byte_tokenizer, digits) is None  # not a Luhn space


# --------------------------------------------------------------------------------------------- the sample re-used


def test_lookup_reproduces_estimated_exposure(tiny_llama, byte_tokenizer) -> None:
    """The check reads the production estimate from enumerated scores: same sample, same value."""
    canary = ec.restrict(make_canaries(1, ("phone",), seed=5)[0][0], 3, None)
    scores = candidate_scores(tiny_llama, byte_tokenizer, canary).numpy()
    sp = canary.space
    secret = scores[sp.index(canary.secret)]
    for seed in (0, 1):
        frees = sample_candidates(sp, canary.secret, 16, seed)
        assert len(frees) == 16 and sp.free_part(canary.secret) not in frees
        sample = scores[[sp.index(sp.compose(f)) for f in frees]]
        res = estimated_exposure(tiny_llama, byte_tokenizer, canary, n_samples=16, seed=seed)
        assert res.sample_fraction_above == float((sample >= secret).mean())
        assert skewnorm_exposure(-secret, -sample, sp.size_log2) == pytest.approx(res.exposure, abs=1e-3)
    assert sample_candidates(sp, canary.secret, 16, 0) != sample_candidates(sp, canary.secret, 16, 1)


def test_empirical_exposure_known_answers() -> None:
    samples = np.arange(63, dtype=np.float64)  # scores 0..62
    assert empirical_exposure(100.0, samples, 40.0) == pytest.approx(6.0)  # likelier than all: log2(64)
    assert empirical_exposure(-1.0, samples, 40.0) == 0.0  # rank 64 of 64
    assert empirical_exposure(55.5, samples, 40.0) == pytest.approx(3.0)  # 7 above: rank 8 -> 6 - 3
    assert empirical_exposure(55.0, samples, 40.0) == pytest.approx(6 - math.log2(8.5))  # one tie counts half
    assert empirical_exposure(100.0, np.arange(3.0), 1.5) == 1.5  # capped at log2|R|
    with pytest.raises(ValueError, match="at least one sample"):
        empirical_exposure(1.0, np.array([]), 4.0)


# --------------------------------------------------------------------------------------------- statistics


def test_band_and_summary_on_known_errors() -> None:
    assert st.band(np.arange(101.0)) == (5.0, 95.0)
    s = st.error_summary([np.array([-2.0, 0.0, 2.0]), np.array([1.0, 1.0, 1.0])], band_bits=1.0, n_boot=200)
    # pooled sorted [-2, 0, 1, 1, 1, 2]: p5 at position 0.25 -> -1.5, p95 at 4.75 -> 1.75
    assert s["band"] == pytest.approx([-1.5, 1.75]) and not s["within"]
    assert s["bias"] == pytest.approx(0.5) and s["median"] == pytest.approx(1.0)
    assert s["rmse"] == pytest.approx(math.sqrt(11 / 6)) and s["share_within"] == pytest.approx(4 / 6)
    assert (s["canaries"], s["pairs"]) == (2, 6)
    assert st.error_summary([np.array([-2.0, 0.0, 2.0]), np.array([1.0, 1.0, 1.0])], band_bits=2.0)["within"]
    edge = st.error_summary([np.arange(-10.0, 11.0)], band_bits=9.0)  # band exactly [-9, 9]: inclusive
    assert edge["band"] == pytest.approx([-9.0, 9.0]) and edge["within"]
    assert not st.error_summary([np.arange(-10.0, 11.0)], band_bits=8.99)["within"]
    assert st.error_summary([]) is None


def test_bootstrap_resamples_canaries() -> None:
    # identical canaries: every resample pools the same 15 values, so each CI collapses onto the band edge
    # (sorted 0,0,0,0,0,1,..,2: p5 at position 0.7 -> 0, p95 at 13.3 -> 2)
    same = st.bootstrap_band([np.array([0.0, 1.0, 2.0])] * 5, n_boot=100)
    assert same == {"lo": [0.0, 0.0], "hi": [2.0, 2.0]}
    rng = np.random.default_rng(0)
    groups = [rng.normal(c, 1.0, size=20) for c in rng.normal(0, 3, size=30)]
    ci = st.bootstrap_band(groups, n_boot=400, seed=1)
    lo, hi = st.band(np.concatenate(groups))
    assert ci["lo"][0] < lo < ci["lo"][1] and ci["hi"][0] < hi < ci["hi"][1]
    assert ci == st.bootstrap_band(groups, n_boot=400, seed=1)


def test_bins_groups_censoring_and_conclusion() -> None:
    assert [st.exposure_bin(x, (4, 8, 12)) for x in (0.0, 3.99, 4.0, 11.99, 12.0, 13.3)] == \
        ["<4", "<4", "4-8", "8-12", ">=12", ">=12"]
    recs = [{"kind": "id", "member": True, "exact": 2.0, "censored": False, "estimates": {"e": [3.0, 3.0]}},
            {"kind": "id", "member": True, "exact": 13.3, "censored": True, "estimates": {"e": [0.0, 14.0]}},
            {"kind": "card", "member": False, "exact": 9.0, "censored": False, "estimates": {"e": [8.0, 10.0]}}]
    s = st.summarise_estimator(recs, "e", (4, 8, 12), n_boot=20)
    assert s["all"]["pairs"] == 4 and s["all"]["bias"] == pytest.approx(0.5)  # errors 1, 1, -1, 1
    assert s["members"]["pairs"] == 2 and s["nonmembers"]["bias"] == pytest.approx(0.0)
    assert s["kind:id"]["canaries"] == 1 and s["bin:8-12"]["canaries"] == 1 and s["bin:>=12"] is None
    c = st.censored_summary(recs, "e")
    assert c["canaries"] == 1 and c["share_below_bound"] == 0.5  # 0.0 < 13.3 - 1; 14.0 is not


def _summary(errs: list[list[float]]) -> dict:
    return st.error_summary([np.asarray(e) for e in errs], n_boot=50)


def test_conclusion_judges_pooled_band_every_populated_bin_and_censored() -> None:
    good = {"all": _summary([[0.5, -0.5]] * 4), "bin:<4": _summary([[0.5, -0.5]] * 3),
            "bin:>=12": _summary([[5.0, 5.0]] * 2)}  # 2 canaries: below min_canaries, not judged
    out = st.conclusion({"skewnorm_64": good}, {}, "skewnorm_64", 1.0, 0.9, (64,))
    assert out["verdicts"] == {"all": True, "bin:<4": True}
    assert out["within_band"] and out["primary_metric_recommendation"] == st.PRIMARY_OK
    assert out["skewnorm_sample_sizes_within_band"] == [64] and "Within ±1 bit" in out["statement"]
    # a populated tail bin outside the band fails the estimator although the pooled band is fine
    tail = {**good, "bin:8-12": _summary([[3.0, 3.0]] * 3)}
    out = st.conclusion({"skewnorm_64": tail}, {}, "skewnorm_64", 1.0, 0.9, (64,))
    assert out["verdicts"]["all"] and not out["verdicts"]["bin:8-12"] and not out["within_band"]
    assert out["primary_metric_recommendation"] == st.PRIMARY_REPLACE
    assert out["failing_with_confidence"] == ["bin:8-12"] and "failing: bin:8-12" in out["statement"]
    # censored canaries read too low in more than 5% of the cases fail it as well; in exactly 5%, not
    for share, ok in ((0.06, False), (0.05, True)):
        cens = {"skewnorm_64": {"canaries": 3, "share_below_bound": share}}
        out = st.conclusion({"skewnorm_64": good}, cens, "skewnorm_64", 1.0, 0.9, (64,))
        assert out["verdicts"]["censored"] is ok and out["within_band"] is ok
    wide = {"all": _summary([[3.0, -0.5]] * 4)}
    errors = {"skewnorm_64": wide, "skewnorm_256": good, "empirical_64": {"in_range": wide["all"]},
              "empirical_256": {"in_range": good["all"]}}
    out = st.conclusion(errors, {}, "skewnorm_64", 1.0, 0.9, (64, 256))
    assert not out["within_band"] and out["skewnorm_sample_sizes_within_band"] == [256]
    assert out["empirical_sample_sizes_within_band_in_range"] == [256]
    with pytest.raises(ValueError, match="no uncensored canary"):
        st.conclusion({"skewnorm_64": {"all": None}}, {}, "skewnorm_64", 1.0, 0.9, (64,))


# --------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("exposure_check")
    lines: list[str] = []
    return ec.run_exposure_check(TINY, work, progress=False, log=lines.append), work, lines


def test_tiny_run_measures_every_canary(tiny_run, byte_tokenizer) -> None:
    result, work, lines = tiny_run
    recs = result["canaries"]
    assert sorted((r["kind"], r["member"]) for r in recs) == sorted((k, m) for k in ec.KINDS for m in (True, False))
    assert any("conclusion" in line for line in lines)
    members, nonmembers = ec.build_canaries(TINY)
    model = load_saved_model(work / "ft")
    for canary, r in zip(members + nonmembers, recs, strict=True):
        ref = exact_exposure(model, byte_tokenizer, canary)  # the library's own path (one by one for cards)
        assert r["rank"] == ref.rank and r["exact"] == pytest.approx(ref.exposure, abs=1e-12)
        assert r["censored"] == (ref.rank == 1) and 0 <= r["exact"] <= r["size_log2"]
        assert r["enumeration"] == ("charwise+luhn" if canary.kind == "card" else "charwise")
        assert set(r["estimates"]) == {"skewnorm_16", "skewnorm_32", "empirical_16", "empirical_32", "as_called_16"}
        assert all(len(v) == TINY.n_seeds for v in r["estimates"].values()) and r["estimate_s"] >= 0
        assert r["estimates"]["as_called_16"] == [min(x, r["size_log2"]) for x in r["estimates"]["skewnorm_16"]]
    assert result["checks"]["lookup_vs_direct"]["pairs"] == len(recs)
    assert result["checks"]["lookup_vs_direct"]["max_abs_exposure_diff"] < 1e-3
    luhn = result["checks"]["luhn_vs_library"]
    assert luhn["used"] and luhn["rank_charwise"] == luhn["rank_library"] and luhn["max_abs_logprob_diff"] < 1e-5
    json.dumps(result)  # plain JSON


def test_tiny_run_statistics_follow_from_its_canaries(tiny_run) -> None:
    result = tiny_run[0]
    live = [r for r in result["canaries"] if not r["censored"]]
    errs = np.concatenate([np.asarray(r["estimates"]["skewnorm_16"]) - r["exact"] for r in live])
    main = result["errors"]["skewnorm_16"]["all"]
    assert main["pairs"] == errs.size == len(live) * TINY.n_seeds
    assert main["bias"] == pytest.approx(errs.mean())
    lo, hi = np.sort(errs)[[0, -1]]
    assert lo <= main["band"][0] <= main["band"][1] <= hi
    con = result["conclusion"]
    groups = result["errors"]["skewnorm_16"]
    judged = {g: s for g, s in groups.items() if g == "all" or (g.startswith("bin:") and s and s["canaries"] >= 3)}
    assert set(con["verdicts"]) - {"censored"} == set(judged)
    inside = all(s["band"][0] >= -1.0 and s["band"][1] <= 1.0 for s in judged.values())
    cens = result["censored"]["skewnorm_16"]
    if cens["canaries"] >= 3:
        inside = inside and cens["share_below_bound"] <= 0.05
    assert con["within_band"] == inside
    assert con["primary_metric_recommendation"] == (st.PRIMARY_OK if inside else st.PRIMARY_REPLACE)


def test_tiny_run_resumes_from_its_cache(tiny_run, monkeypatch) -> None:
    first, work, _ = tiny_run
    monkeypatch.setattr(ec, "train", lambda *a, **k: pytest.fail("the cached model was trained again"))
    again = ec.run_exposure_check(TINY, work, progress=False, log=lambda _: None)
    assert again["stages"]["finetune"]["reused"] and again["stages"]["canaries"]["reused"] == len(first["canaries"])
    assert again["canaries"] == first["canaries"] and again["errors"] == first["errors"]
    victim = sorted((work / "canaries").glob("email-n-*.json"))
    assert len(victim) == 1
    victim[0].unlink()  # one unfinished canary: only it is measured again
    calls: list[str] = []
    real = ec.exact_record
    monkeypatch.setattr(ec, "exact_record", lambda m, t, c, cfg: calls.append(c.kind) or real(m, t, c, cfg))
    third = ec.run_exposure_check(TINY, work, progress=False, log=lambda _: None)
    assert calls == ["email"] and third["stages"]["canaries"]["reused"] == len(first["canaries"]) - 1
    assert [r["exact"] for r in third["canaries"]] == [r["exact"] for r in first["canaries"]]


def test_report_is_rendered_from_the_json(tiny_run, tmp_path) -> None:
    result = json.loads(json.dumps(tiny_run[0]))
    paths = render_mod.render(result, tmp_path)
    md = (tmp_path / "report.md").read_text()
    lo, hi = result["conclusion"]["band"]
    assert result["conclusion"]["statement"] in md and f"[{lo:+.2f}, {hi:+.2f}]" in md
    assert f"primary_metric_recommendation = {result['conclusion']['primary_metric_recommendation']}" in md
    assert md.count("| skewnorm_16 |") >= 2 and "| email | non-member |" in md and "| 32 | [" in md
    assert (tmp_path / render_mod.FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(paths) == 2


def test_cli_render_only_needs_a_result(tmp_path, capsys) -> None:
    assert bench_cli.main(["--render-only", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "result.json not found" in err and "\n" not in err
