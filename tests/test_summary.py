"""The kill-switch claim logic on known inputs: signs, thresholds, counts and intervals."""

import pytest

from libortho.experiments.summary import check_claims, leak_counts, leak_reduction_holds


def _row(extracted: int, n: int = 24, ppl_general: float = 100.0, private_nll: float = 2.0,
         nll_general: float = 4.0) -> dict:
    return {"per_canary_extracted": [True] * extracted + [False] * (n - extracted), "ppl_general": ppl_general,
            "private_nll": private_nll, "nll_general": nll_general}


def _claims(on: dict, off: dict, ft: dict | None = None) -> dict[str, dict]:
    rows = {"libortho_a1": on, "libortho_a0": off, **({"ft": ft} if ft is not None else {})}
    return {c["key"]: c for c in check_claims(rows)}


def test_leak_reduction_more_leaks_when_switched_off_is_a_failure_with_counts() -> None:
    c = _claims(_row(1), _row(3))["leak_reduction"]
    assert c["holds"] is False and c["measured"] == pytest.approx(-2.0)
    k = c["counts"]
    assert (k["extracted_alpha1"], k["extracted_alpha0"], k["n"]) == (1, 3, 24)
    assert k["ci_alpha1"][0] < 1 / 24 < k["ci_alpha1"][1] and k["ci_alpha0"][0] < 3 / 24 < k["ci_alpha0"][1]
    assert k["mcnemar_only_alpha0"] == 2 and k["mcnemar_p"] == pytest.approx(0.5)  # paired rows nest here
    assert "1/24" in c["detail"] and "3/24" in c["detail"] and "McNemar" in c["detail"]


def test_leak_reduction_needs_significance_not_only_the_point_value() -> None:
    assert _claims(_row(10), _row(0))["leak_reduction"]["holds"] is True  # 10 -> 0: p = 2 / 2^10
    one = _claims(_row(1), _row(0))["leak_reduction"]
    assert one["measured"] == 1.0 and one["holds"] is None  # 1 -> 0 reaches 100% but proves nothing
    assert _claims(_row(0), _row(0))["leak_reduction"]["holds"] is None  # nothing to reduce: undefined
    assert _claims(_row(10), _row(1))["leak_reduction"]["holds"] is False  # 90% < 99.8%


def test_leak_reduction_threshold_edges() -> None:
    c = leak_counts([True] * 600 + [False] * 400, [True] + [False] * 999)
    assert c["reduction"] == pytest.approx(1 - 1 / 600)  # 99.83% >= 99.8%, and hugely significant
    assert leak_reduction_holds(c) is True
    c = leak_counts([True] * 400 + [False] * 600, [True] + [False] * 999)  # 99.75% < 99.8%
    assert leak_reduction_holds(c) is False


def test_general_loss_is_judged_against_alpha1_and_against_fp() -> None:
    claims = _claims(_row(1, ppl_general=101.5), _row(1, ppl_general=103.0), _row(4, ppl_general=95.0))
    vs_on, vs_fp = claims["general_loss"], claims["general_loss_vs_fp"]
    assert vs_on["measured"] == pytest.approx(103.0 / 101.5 - 1) and vs_on["holds"] is True  # +1.5% < 2%
    assert vs_fp["measured"] == pytest.approx(103.0 / 95.0 - 1) and vs_fp["holds"] is False  # +8.4%
    lower = _claims(_row(1, ppl_general=100.0), _row(1, ppl_general=99.0))["general_loss"]
    assert lower["measured"] < 0 and lower["holds"] is True and "lower at alpha=0" in lower["detail"]
    edge = _claims(_row(1, ppl_general=100.0), _row(1, ppl_general=102.0))["general_loss"]
    assert edge["holds"] is False  # exactly +2% does not satisfy "< 2%"
    assert "general_loss_vs_fp" not in _claims(_row(1), _row(1))


def test_error_ratios_direction_and_thresholds() -> None:
    claims = _claims(_row(1, private_nll=1.5, nll_general=4.0), _row(1, private_nll=3.0, nll_general=4.4))
    assert claims["private_error_ratio"]["measured"] == pytest.approx(2.0)  # off / on, not on / off
    assert claims["private_error_ratio"]["holds"] is True
    assert claims["private_error_explodes"]["holds"] is False
    assert claims["general_error_ratio"]["measured"] == pytest.approx(1.1) and claims["general_error_ratio"]["holds"]
    flat = _claims(_row(1, private_nll=2.0), _row(1, private_nll=2.0))
    assert flat["private_error_ratio"]["holds"] is False  # 1.0 is not > 1.5


def test_exact_exposure_ignores_estimated_canaries() -> None:
    from libortho.experiments.summary import exact_exposure

    per = [{"kind": "digits", "repeats": 1, "exposure": 2.0, "exposure_method": "exact"},
           {"kind": "digits", "repeats": 16, "exposure": 8.0, "exposure_method": "exact"},
           {"kind": "email", "repeats": 16, "exposure": 6.0, "exposure_method": "exact"},
           {"kind": "password", "repeats": 16, "exposure": 59.5, "exposure_method": "estimated"}]
    e = exact_exposure(per)
    assert e["mean"] == pytest.approx(16.0 / 3) and e["n"] == 3 and e["kinds"] == ["digits", "email"]
    assert e["by_repeats"] == {"1": 2.0, "16": 7.0}  # the 59.5-bit estimate would dominate if mixed in
    assert exact_exposure(per[3:])["mean"] is None


def test_mcnemar_refuses_canaries_that_do_not_pair() -> None:
    on, off = _row(1), _row(3)
    on["per_canary_secret"] = [str(i) for i in range(24)]
    off["per_canary_secret"] = [str(i) for i in reversed(range(24))]
    with pytest.raises(ValueError, match="different canaries"):
        check_claims({"libortho_a1": on, "libortho_a0": off})
