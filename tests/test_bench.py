"""The benchmark code that produces published numbers: derived figures, verdicts, report rendering."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from comparisons import compare_rows, gap_closed, gptq_reference, verdicts  # noqa: E402
from report import change, render  # noqa: E402


def _m(ppl_nll: np.ndarray) -> dict:
    return {"ppl": float(np.exp(ppl_nll.mean())), "block_nll": ppl_nll.tolist()}


def _table() -> dict:
    rng = np.random.default_rng(0)
    blocks = rng.normal(4.0, 0.3, size=16)
    rows = {"fp32": {"method": "FP32", "ppl_measured": _m(blocks - 0.3)},
            "gptq-g64": {"method": "INT4 GPTQ", "group_size": 64, "ppl_measured": _m(blocks)}}
    for sel, shift in (("obs", -0.05), ("diag", -0.10)):
        for values, extra in (("residual", 0.0), ("optimal", -0.01)):
            rows[f"libortho-g64-{sel}-0.01-{values}"] = {
                "method": "LibOrtho", "group_size": 64, "selector": sel, "rho": 0.01, "values": values,
                "alpha1": _m(blocks + shift + extra + rng.normal(0, 1e-3, size=16)), "total_bits_per_param": 4.98}
    rows["libortho-g64-default-alpha0"] = {
        "method": "LibOrtho", "group_size": 64, "selector": "obs", "rho": 0.01, "values": "residual",
        "alpha0": _m(blocks), "alpha1_reloaded": rows["libortho-g64-obs-0.01-residual"]["alpha1"],
        "total_bits_per_param": 4.98,
        "null_test": {"probe_tokens": 2048, "bit_identical": True, "max_abs_logit_diff": 0.0, "what": "two runs"}}
    rows["hqq-g64"] = {"method": "hqq INT4", "group_size": 64, "error": "not installed"}
    return {"rows": rows, "args": {"group_sizes": [64], "n_calib": 128, "seq_len": 512, "calib": ["shakespeare"],
                                   "eval_corpus": "fortunes", "n_eval": 16},
            "calib_tokens": 65536, "eval_tokens": 8176, "model": "m", "machine": {"cpu": "x", "threads": 2},
            "git": [{"commit": "abc123def456", "dirty_files": [], "started": "t"}],
            "decomposition": {"g64": {"with_ortho": {"wall_s": 10.0, "child_peak_rss_mb": 1000.0, "peak_rss_mb": 900.0,
                                                     "calib_tokens": 65536, "true_sequential": True}}}}


def test_change_is_relative_change_not_ratio() -> None:
    assert change(131.0, 100.0) == "+31.0%" and change(90.0, 100.0) == "-10.0%"


def test_gap_closed_and_reference() -> None:
    assert gap_closed(55.0, 60.0, 50.0) == pytest.approx(0.5)
    assert gap_closed(62.0, 60.0, 50.0) == pytest.approx(-0.2)  # worse than GPTQ: negative, not clipped
    assert gap_closed(50.0, 50.0, 50.0) is None
    tab = _table()
    assert gptq_reference(tab["rows"], 64) is tab["rows"]["gptq-g64"]["ppl_measured"]
    del tab["rows"]["gptq-g64"]
    assert gptq_reference(tab["rows"], 64) is tab["rows"]["libortho-g64-default-alpha0"]["alpha0"]
    assert gptq_reference(tab["rows"], 128) is None


def test_comparisons_find_the_better_selector_and_decide() -> None:
    tab = _table()
    cs = compare_rows(tab["rows"], [64], [0.01])
    dvo = [c for c in cs if c["what"] == "diag_vs_obs"]
    assert len(dvo) == 2 and all(c["better"] == "a" and c["diff"] < 0 and c["ci_high"] < 0 for c in dvo)
    v = verdicts(cs)
    assert v["diag_vs_obs"]["decision"] == "diag" and v["diag_vs_obs"]["diag_significantly_better"] == 2
    assert v["optimal_vs_residual"]["decision"] == "optimal"
    # one configuration going the other way makes the verdict "not separated"
    flipped = [dict(c, better="b") if i == 0 else c for i, c in enumerate(dvo)]
    assert verdicts(flipped)["diag_vs_obs"]["decision"] is None
    assert verdicts([dict(c, better="neither (CI includes 0)") for c in dvo])["diag_vs_obs"]["decision"] is None


def test_report_renders_every_section_from_json(tmp_path) -> None:
    tab = _table()
    tab["comparisons"] = compare_rows(tab["rows"], [64], [0.01])
    tab["verdicts"] = verdicts(tab["comparisons"])
    (tmp_path / "ppl_table.json").write_text(json.dumps(tab))
    lat = {"decode_s_per_token": {"base_only": 0.03, "alpha0": 0.03, "alpha1": 0.045},
           "prefill_16x128_s": {"base_only": 5.0, "alpha0": 5.0, "alpha1": 7.0},
           "ratios": {"overhead_decode_alpha1_over_alpha0": 1.5}, "threads": 2, "runs": 3, "prefill_runs": 3,
           "decode_steps": 8, "dir": "d", "git": [{"commit": "fedcba987654", "dirty_files": [" M x.py"],
                                                   "started": "t"}]}
    (tmp_path / "latency.json").write_text(json.dumps(lat))
    md = render(tmp_path)
    fp = tab["rows"]["fp32"]["ppl_measured"]["ppl"]
    gptq = tab["rows"]["gptq-g64"]["ppl_measured"]["ppl"]
    assert f"| INT4 GPTQ | 64 | - | - | - | {gptq:.3f} | - | {gptq / fp - 1:+.1%} |" in md
    assert "failed: not installed" in md
    assert "bit-identical = **True**" in md and "decision: **diag**" in md
    assert "`abc123def4`" in md and "(clean tree)" in md and "1 uncommitted file(s): x.py" in md
    assert "| overhead_decode_alpha1_over_alpha0 | 1.5000 | <= 1.10 |" in md
    assert "after every stage of the decomposition 900 MiB" in md and "high-water mark 1000 MiB" in md
    assert "| 0.0001 | a |" in md  # p-value column and the Holm-decided winner


def test_readme_results_block_matches_the_committed_json() -> None:
    """The README's figures are rendered from docs/results; a changed result must be re-rendered."""
    from readme_results import ROOT, render_block, replace_block

    text = (ROOT / "README.md").read_text()
    assert replace_block(text, render_block(ROOT / "docs" / "results")) == text, \
        "README results block is stale: run .venv/bin/python bench/readme_results.py"


def test_readme_dual_stream_lines_from_a_known_table() -> None:
    from readme_results import dual_stream_lines, replace_block

    tab = _table()
    tab["verdicts"] = verdicts(compare_rows(tab["rows"], [64], [0.01]))
    lines = "\n".join(dual_stream_lines(tab, None, "x.md"))
    fp = tab["rows"]["fp32"]["ppl_measured"]["ppl"]
    gptq = tab["rows"]["gptq-g64"]["ppl_measured"]["ppl"]
    assert f"{gptq / fp - 1:+.1%} vs FP32 for GPTQ" in lines and "bit-identical logits: **True**" in lines
    assert "diag significantly better than obs in 2 of 2" in lines and "the data favour diag" in lines
    with pytest.raises(ValueError, match="no <!-- results:begin -->"):
        replace_block("no markers here", "x")


def test_readme_confirmation_line_pools_seeds_and_names_each_miss() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from libortho.experiments.separation_summary import summarise_separation
    from readme_results import separation_confirmation_lines
    from test_report_separation import N, synthetic

    res = synthetic(seeds=("1", "2"))
    res["config"]["seeds"] = [1, 2, 3]
    line = separation_confirmation_lines(res, "r.md")[0]
    assert "2 of 3 seeds complete" in line and "provisional" in line
    # ogd leaks 2 of N per seed at alpha = 0: pooled over both seeds it is 4 of 2N, named as a miss
    assert "ogd (pooled over seeds 1, 2)" in line
    assert f"INT4 a=0 vs quantized retrain: extraction = 0 ({2 * 2}/{2 * N} [" in line
    mask = line.split("mask (pooled over seeds 1, 2): ")[1].split(". ogd")[0]
    assert mask == "13/13 goals met"  # 6 INT4 + 6 FP alpha = 0 goals and the alpha = 1 one, none missed
    # a seed part-way (seed 2 without mask's INT4 alpha = 1 row): no pool over a subset, each seed alone
    del res["seeds"]["2"]["evals"]["mask_int4_a1"]
    res["summary"] = summarise_separation(res)
    line = separation_confirmation_lines(res, "r.md")[0]
    assert "pooled" not in line.split("ogd")[0]
    assert "mask (seed 1): 13/13 goals met" in line and "mask (seed 2, part-way): 12/12 goals met" in line


@pytest.mark.slow
def test_ppl_table_end_to_end_on_the_tiny_model(tmp_path) -> None:
    """Every stage on the tiny model: two independent child decompositions, the null test, the sweep, peers,
    comparisons; then a second run resumes without recomputing anything."""
    import ppl_table

    out = tmp_path / "t.json"
    argv = ["--model", "tiny", "--out", str(out), "--work", str(tmp_path / "w"), "--group-sizes", "32",
            "--null-groups", "32", "--rhos", "0.01", "--selectors", "obs", "diag", "--optimal-selectors", "obs",
            "--baselines", "--calib", "shakespeare", "--eval-corpus", "shakespeare", "--n-calib", "4",
            "--n-eval", "4", "--seq-len", "32"]
    ppl_table.main(argv)
    tab = json.loads(out.read_text())
    rows = tab["rows"]
    assert tab["partial"] is False
    assert {"fp32", "gptq-g32", "rtn-g32", "libortho-g32-default-alpha0", "libortho-g32-obs-0.01-residual",
            "libortho-g32-diag-0.01-residual", "libortho-g32-obs-0.01-optimal"} <= set(rows)
    d = rows["libortho-g32-default-alpha0"]
    assert d["null_test"]["bit_identical"] is True  # two separate processes, with and without ortho
    assert d["alpha0"]["ppl"] == rows["gptq-g32"]["ppl_measured"]["ppl"]  # measured twice, not copied
    # the saved-and-reloaded default equals the same stream re-selected from the saved Hessians
    assert d["alpha1_reloaded"]["ppl"] == rows["libortho-g32-obs-0.01-residual"]["alpha1"]["ppl"]
    assert d["alpha0"]["ppl"] != d["alpha1_reloaded"]["ppl"]
    dec = tab["decomposition"]["g32"]
    assert set(dec) == {"with_ortho", "base_only"} and dec["base_only"]["child_peak_rss_mb"] > 0
    assert len(d["alpha0"]["block_nll"]) == 4 and tab["comparisons"]
    before = out.read_text()
    ppl_table.main(argv)  # resumes: every stage is cached, only the provenance list grows
    again = json.loads(out.read_text())
    assert again["rows"] == tab["rows"] and len(again["git"]) == 2 and before != out.read_text()


def test_decompose_profile_reports_the_ratio_and_where_the_time_went(tmp_path) -> None:
    """bench/decompose_profile.py on the tiny model: the ratio is decomposition over the forward it timed,
    the phases cover the wall time without double counting, and the goals' verdicts follow the figures."""
    import subprocess

    out = tmp_path / "profile.json"
    script = Path(__file__).resolve().parent.parent / "bench" / "decompose_profile.py"
    subprocess.run([sys.executable, str(script), "--model", "tiny", "--n-calib", "4", "--seq-len", "32",
                    "--group-size", "32", "--quality", "--eval-corpus", "shakespeare", "--n-eval", "3",
                    "--out", str(out)], check=True, capture_output=True)
    r = json.loads(out.read_text())
    assert r["ratio_to_forward"] == pytest.approx(r["decompose_s"] / r["fp32_forward_s"])
    assert r["calib_tokens"] == 4 * 32 and r["blocks"] >= 1 and r["block_plans"] == ["prenorm-gated"]
    q = r["quality"]
    for a in ("alpha0", "alpha1"):
        for k in ("fp32_precision", "bf16_forward_fp32_products", "default_calib_seed1"):
            d = q[f"delta_{a}"][f"default_minus_{k}"]
            assert d["lo"] <= d["mean"] <= d["hi"]
        assert len(q["default"][a]["block_nll"]) == 3
    top = sum(v for k, v in r["phase_fraction"].items() if k != "quantize_cholesky")
    assert 0.6 <= top <= 1.001
    assert r["goals"]["ratio_to_forward"]["holds"] == (r["ratio_to_forward"] <= 1.0)
    assert r["goals"]["peak_rss_mb"]["holds"] == (r["peak_rss_mb"] <= 2048)


def test_decompose_profile_refuses_a_bad_out_path_before_loading_anything(tmp_path) -> None:
    import subprocess

    script = Path(__file__).resolve().parent.parent / "bench" / "decompose_profile.py"
    p = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "x.txt")], capture_output=True, text=True)
    assert p.returncode != 0 and "--out must be a .json file" in p.stderr
    assert not (tmp_path / "x.txt").exists()


def test_performance_report_judges_each_goal_from_the_figures(tmp_path) -> None:
    """Goals follow the JSON figures: a ratio above its threshold fails, gap closure is (GPTQ - a1) /
    (GPTQ - FP32), bits per nonzero is ortho bits over density, and the report renders every goal."""
    import performance_report as pr

    prof = {"decompose_s": 120.0, "ratio_to_forward": 1.05, "peak_rss_mb": 1900.0, "block_plans": ["prenorm-gated"],
            "config": {"calib_dtype": "bf16"}, "phase_s": {"stage_forward": 60.0}, "phase_fraction":
            {"stage_forward": 0.5}, "git": {"commit": "abc"}}
    lat = {"ratios": {"overhead_decode_alpha1_over_alpha0": 1.2, "overhead_prefill_alpha1_over_alpha0": 1.01,
                      "prefill_16x128_alpha0_over_fp32": 0.5, "prefill_1x512_alpha0_over_fp32": 0.9},
           "decode_s_per_token": {"alpha0": 0.030}, "resident": {"base_bytes_per_param": 0.625},
           "kernels": {"kernels": {"int4pack": 210}, "fallbacks": {}}, "git": [{"commit": "def"}]}
    nll = {"ppl": 1.0, "block_nll": [0.0]}
    rows = {"fp32": {"ppl_measured": {**nll, "ppl": 40.0}}, "gptq-g64": {"ppl_measured": {**nll, "ppl": 50.0}},
            "hqq-g64": {"ppl_measured": {**nll, "ppl": 48.0}, "bits_per_param": 4.5},
            "libortho-g64-default-alpha0": {"alpha0": {**nll, "ppl": 50.0}, "total_bits_per_param": 4.76,
                                            "base_bits_per_param": 4.5, "ortho_bits_per_param": 0.26,
                                            "ortho_density": 0.01, "quantized_params": 100},
            "libortho-g64-obs-0.01-residual": {"alpha1": {**nll, "ppl": 43.0}, "rho": 0.01,
                                               "total_bits_per_param": 4.76}}
    goals = {g["goal"]: g for g in pr.evaluate(prof, {"rows": rows}, lat, {"profile": None, "ppl": None,
                                                                            "latency": None})}
    assert goals["1 decomposition wall time (s)"]["holds"] is True
    assert goals["1 decomposition / one FP32 forward (same run)"]["holds"] is False
    assert goals["2 decode alpha1 / alpha0"]["holds"] is False and goals["2 prefill 16x128 alpha1 / alpha0"]["holds"]
    assert goals["4 alpha1 closes the GPTQ -> FP32 gap, ppl-table config"]["value"] == pytest.approx(0.7)
    assert goals["4 alpha0 ppl / HQQ g64 ppl, ppl-table config (held-out fortunes)"]["holds"] is False
    assert goals["5 bits per stored nonzero (index included)"]["value"] == pytest.approx(26.0)
    assert goals["7 layers off the INT4 kernel at the default group size"]["holds"] is True
    text = pr.render({"goals": list(goals.values()), "profile": prof, "sources": {}})
    assert all(name in text for name in goals) and "**no**" in text
    # the searched default: goals read from its report-corpus figures, the table from every candidate
    two = {"validation": 20.0, "report": 50.0}
    search = {"validation": "python-docs", "report": "fortunes", "n_eval": 32, "n_validation": 16,
              "references": {"fp32": {"validation": 18.0, "report": 40.0}, "hqq_g64": {"validation": 21.0,
                                                                                       "report": 49.0}},
              "candidates": {"minmax": {"alpha0": two, "alpha1": {"obs-residual": {"validation": 19.0,
                                                                                   "report": 45.0}}}},
              "choice": {"candidate": "minmax", "variant": "obs-residual", "rule": "r",
                         "report": {"alpha0_over_hqq": 50 / 49, "gap_closed": 0.5}}}
    goals = {g["goal"]: g for g in pr.evaluate(None, None, None, {"profile": None, "ppl": None, "latency": None},
                                               search)}
    assert goals["4 alpha0 ppl / HQQ g64 ppl, searched default (report corpus)"]["holds"] is False
    assert goals["4 alpha1 gap closed, searched default (report corpus)"]["value"] == 0.5
    text = "\n".join(pr.search_table(search))
    assert "| minmax | 20.000 | 50.000 | obs-residual | 19.000 | 45.000 | 0.500 | 0.500 |" in text


def test_quality_search_chooses_on_validation_and_keeps_each_candidate(tmp_path) -> None:
    """bench/quality_search.py on the tiny model: every candidate scored on both corpora with every ortho
    variant, gap closure measured from the non-joint twin, and the choice made by its rule from validation
    figures: a base whose alpha0 is worse than the slack is never chosen, however much gap it closes."""
    import subprocess

    import quality_search as qs

    out = tmp_path / "qs.json"
    script = Path(__file__).resolve().parent.parent / "bench" / "quality_search.py"
    subprocess.run([sys.executable, str(script), "--model", "tiny", "--validation", "python-docs", "--report",
                    "shakespeare", "--candidates", "minmax", "minmax-joint", "--n-calib", "4", "--seq-len", "32",
                    "--n-eval", "2", "--n-validation", "2", "--rho", "0.05", "--out", str(out)],
                   check=True, capture_output=True)
    r = json.loads(out.read_text())
    assert set(r["candidates"]) == {"minmax", "minmax-joint"} and set(r["references"]) == {"fp32", "hqq_g64"}
    assert set(r["candidates"]["minmax"]["alpha1"]) == set(qs.VARIANTS)
    assert set(r["candidates"]["minmax-joint"]["alpha1"]) == set(qs.VARIANTS) - {"obs-optimal-global"}
    assert r["candidates"]["minmax-joint"]["config"]["select"]["joint"] is True
    for c in r["candidates"].values():
        assert set(c["alpha0"]) == {"validation", "report"}
        assert all(set(v) >= {"validation", "report", "select"} for v in c["alpha1"].values())
    assert r["choice"] == qs.choose(r)
    # a variant added later is filled in by decomposing again; that re-run's alpha0 is the same decomposition's
    del r["candidates"]["minmax"]["alpha1"]["diag-residual"]
    out.write_text(json.dumps(r))
    subprocess.run([sys.executable, str(script), "--model", "tiny", "--validation", "python-docs", "--report",
                    "shakespeare", "--candidates", "minmax", "--n-calib", "4", "--seq-len", "32",
                    "--n-eval", "2", "--n-validation", "2", "--rho", "0.05", "--out", str(out)],
                   check=True, capture_output=True)
    r2 = json.loads(out.read_text())
    clash = subprocess.run([sys.executable, str(script), "--model", "tiny", "--rho", "0.02", "--out", str(out)],
                           capture_output=True, text=True)
    assert clash.returncode != 0 and "other settings" in clash.stderr  # cached results never mixed with others
    assert json.loads(out.read_text()) == r2
    assert set(r2["candidates"]["minmax"]["alpha1"]) == set(qs.VARIANTS)
    assert r2["candidates"]["minmax"]["reruns"][0]["variants"] == ["diag-residual"]
    assert r2["candidates"]["minmax"]["reruns"][0]["alpha0"] == r["candidates"]["minmax"]["alpha0"]
    # the joint candidate's gap is measured from plain GPTQ's alpha0, not from its own
    c, plain, fp = r["candidates"]["minmax-joint"], r["candidates"]["minmax"], r["references"]["fp32"]
    want = (plain["alpha0"]["report"] - c["alpha1"]["obs-residual"]["report"]) / (plain["alpha0"]["report"]
                                                                                  - fp["report"])
    assert qs.gap_closed(r, "minmax-joint", "obs-residual", "report") == pytest.approx(want)
    fake = json.loads(json.dumps(r2))
    fp_v = fake["references"]["fp32"]["validation"]
    fake["candidates"]["minmax"]["alpha0"]["validation"] = 2 * fp_v
    fake["candidates"]["minmax-joint"]["alpha0"]["validation"] = 2.5 * fp_v  # outside the 1% slack
    for v in fake["candidates"]["minmax-joint"]["alpha1"].values():
        v["validation"] = fp_v  # closes the whole gap, yet its alpha0 rules it out
    for i, v in enumerate(fake["candidates"]["minmax"]["alpha1"].values()):
        v["validation"] = 2 * fp_v - 0.1 * (i + 1) * fp_v
    ch = qs.choose(fake)
    assert ch["candidate"] == "minmax" and ch["variant"] == list(qs.VARIANTS)[-1]
    fake["candidates"]["minmax-joint"]["alpha0"]["validation"] = 2 * fp_v
    assert qs.choose(fake)["candidate"] == "minmax-joint"


def test_peers_table_shows_each_peer_or_why_it_did_not_run() -> None:
    """torchao rows join the table's peers; a peer that could not run shows its error, not a number."""
    import performance_report as pr

    ppl = {"rows": {"fp32": {"ppl_measured": {"ppl": 40.0}, "bits_per_param": 32.0},
                    "hqq-g64": {"ppl_measured": {"ppl": 48.0}, "bits_per_param": 4.5, "time_s": 3.0}}}
    tao = {"torchao": "0.18.0", "fp32_vs_table": {"rel_diff": 0.0},
           "rows": {"fp32": {"method": "FP32 (this environment)", "ppl_measured": {"ppl": 40.0}},
                    "torchao-rtn": {"method": "torchao rtn", "ppl_measured": {"ppl": 55.5}, "bits_per_param": 4.625,
                                    "quantize_s": 0.2, "bits_meta": ["scale torch.float32, zero torch.int8"]},
                    "torchao-gptq": {"method": "torchao gptq", "error": "ValueError: mslk is not installed"}}}
    text = "\n".join(pr.peers_table(ppl, tao))
    assert "| torchao rtn | 55.5 | 4.625 | 0.2 | scale torch.float32, zero torch.int8 |" in text
    assert "| torchao gptq | – | – | – | ValueError: mslk is not installed |" in text
    assert "| HQQ g64 | 48 | 4.5 | 3 |" in text and "FP32 (this environment)" not in text


def test_peers_torchao_refuses_clearly_without_torchao(tmp_path) -> None:
    """The main environment has no torchao (on purpose): the script says where to run it, writes nothing."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("torchao") is not None:
        pytest.skip("torchao is installed in this environment")
    script = Path(__file__).resolve().parent.parent / "bench" / "peers_torchao.py"
    out = tmp_path / "p.json"
    p = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True)
    assert p.returncode != 0 and "make peers-venv" in p.stderr and not out.exists()


def test_peers_torchao_bits_count_codes_and_stored_meta() -> None:
    """4-bit codes plus each group's scale and zero at their dtype; a layer left dense counts its own bits."""
    import torch

    from peers_torchao import _bits

    class Quantized(torch.nn.Module):  # stands in for a linear whose weight carries torchao's qparams
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.zeros(4, 128)
            self.weight.scale = torch.zeros(4, 2, dtype=torch.float32)
            self.weight.zero_point = torch.zeros(4, 2, dtype=torch.int8)

    q = Quantized()
    dense = torch.nn.Linear(128, 4, bias=False)
    m = torch.nn.ModuleDict({"q": q, "d": dense})
    r = _bits(m, {"q"})
    assert r["bits_per_param"] == pytest.approx(4 + (32 + 8) / 64) and r["dense_layers"] == []
    assert r["stored_bits_per_param"] == pytest.approx(4 + (32 + 8) / 64)  # no qdata: codes counted packed
    q.weight.qdata = torch.zeros(4, 128, dtype=torch.int8)  # torchao's unpacked layout: one int8 per code
    assert _bits(m, {"q"})["stored_bits_per_param"] == pytest.approx(8 + (32 + 8) / 64)
    r = _bits(m, {"q", "d"})
    assert r["bits_per_param"] == pytest.approx((4 + 40 / 64 + 32) / 2) and r["dense_layers"] == ["d"]


def test_kfac_selector_references_check_the_base_and_render_from_the_json() -> None:
    """Sparse rows join only when their alpha = 0 perplexity shows the same base; every figure comes from state."""
    import torch

    import kfac_selector as ks

    table = {"rows": {"fp32": {"ppl_measured": {"ppl": 40.0}}, "gptq-g64": {"ppl_measured": {"ppl": 50.0}},
                      "libortho-g64-obs-0.01-residual": {"alpha1": {"ppl": 47.0, "block_nll": [1.0, 2.0]},
                                                         "total_bits_per_param": 4.78}}}
    same = {"candidates": {"minmax": {"alpha0": {"report": 50.0}, "alpha1": {"diag-optimal": {"report": 45.0}}}}}
    other = {"candidates": {"minmax": {"alpha0": {"report": 51.0}, "alpha1": {"diag-optimal": {"report": 45.0}}}}}
    assert "diag-optimal" in ks.references(table, same) and "diag-optimal" not in ks.references(table, other)
    ref = ks.references(table, same)
    state = {"references": ref, "protocol": {"decomposition": "d", "damp": 0.1, "eval_corpus": "fortunes",
                                             "n_eval": 2, "seq_len": 8},
             "factors": {"fisher": "true", "n_blocks": 4, "seq_len": 8, "calib": ["c"], "fit_s": 3.0},
             "rows": {"kfac": {"ranks": {"min": 1, "max": 3}, "total_bits_per_param": 4.77, "base_bits_per_param": 4.5,
                               "alpha1": {"ppl": 44.0, "block_nll": [0.9, 1.9]}}}}
    ks.finalize(state)
    assert state["gap_closed"]["kfac"] == pytest.approx((50 - 44) / (50 - 40))
    assert state["gap_closed"]["sparse obs-residual"] == pytest.approx(0.3)
    assert state["paired"]["kfac"]["obs-residual"]["mean"] < 0 and "diag-residual" not in state["paired"]["kfac"]
    text = ks.render(state)
    assert "| K-FAC best rank-r (whitened SVD) (rank 1-3) | 4.770 | 44.000 | 0.600 | " in text
    assert "| sparse diag-optimal rho 1% | as obs-residual | 45.000 | 0.500 | | |" in text
    B, A = ks.svd_memory(torch.diag(torch.tensor([3.0, 2.0, 1.0])), 2)
    assert torch.allclose(B @ A, torch.diag(torch.tensor([3.0, 2.0, 0.0])), atol=1e-6)
