"""The privacy kill-switch experiment (seed 002 §5.2, figure 1, table 1), measured honestly.

fine-tune (public domain + private canary records) -> decompose (GPTQ INT4 base on public
calibration + sparse ortho stream) -> sweep alpha -> every metric, beside the model before
fine-tuning, the FP fine-tuned model, INT4 RTN and GPTQ without ortho, the unlearning baselines
and retraining without the private records. One JSON result; plots and reports are rendered
from it (:mod:`libortho.report`).
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from libortho.atomic import atomic_write_json
from libortho.config import DecomposeConfig
from libortho.data import calibration_blocks, load_corpus, token_blocks
from libortho.data.canaries import Canary, make_canaries, private_documents
from libortho.data.corpora import default_general_corpus
from libortho.data.records import TokenRows, mixture, pack_records, pad_rows, record_ids, separator_id
from libortho.eval.harness import PrivacyHarness
from libortho.experiments.config import KillSwitchConfig
from libortho.experiments.store import cached_model
from libortho.experiments.summary import summarise
from libortho.models import build_tiny_llama, decoder_blocks, load_model, refuse_conv1d
from libortho.pipeline import decompose
from libortho.runtime import set_alpha
from libortho.train.loop import train
from libortho.train.unlearn import UnlearnTask, run_unlearning

RESULT_FILE = "result.json"


@dataclass
class KillSwitchData:
    """Everything the experiment trains and measures on, built once from the config."""

    members: list[Canary]
    nonmembers: list[Canary]
    public: TokenRows
    private: TokenRows
    forget: TokenRows
    domain_eval: torch.Tensor
    general_eval: torch.Tensor
    general_train: torch.Tensor | None
    calibration: torch.Tensor
    private_calibration: torch.Tensor
    general_name: str
    private_calibration_labels: torch.Tensor | None = None  # -100 on separators and padding

    def describe(self) -> dict[str, Any]:
        return {"members": len(self.members), "nonmembers": len(self.nonmembers),
                "public_rows": len(self.public), "public_tokens": self.public.tokens,
                "private_rows": len(self.private), "private_tokens": self.private.tokens,
                "private_occurrences": sum(c.repeats for c in self.members),
                "domain_eval_tokens": int(self.domain_eval.numel()),
                "general_eval_tokens": int(self.general_eval.numel()),
                "pretrain_tokens": 0 if self.general_train is None else int(self.general_train.numel()),
                "calibration_tokens": int(self.calibration.numel()), "general_corpus": self.general_name,
                "canaries": [{"kind": c.kind, "repeats": c.repeats, "member": c.member, "text": c.text}
                             for c in self.members + self.nonmembers]}


def build_data(cfg: KillSwitchConfig, tok: Any) -> KillSwitchData:
    """Canaries, training rows, evaluation blocks and calibration sets, all seeded by ``cfg.seed``."""
    general = default_general_corpus() if cfg.general == "auto" else cfg.general
    domain_docs, general_docs = load_corpus(cfg.domain), load_corpus(general)
    members, nonmembers = make_canaries(cfg.canaries_per_kind, cfg.kinds, cfg.repeats, cfg.seed, cfg.digits_len)
    sep = separator_id(tok)
    public = TokenRows.from_blocks(token_blocks(domain_docs, tok, cfg.block_len, cfg.public_blocks, seed=cfg.seed))
    private = pack_records(record_ids(tok, private_documents(members, cfg.seed)), cfg.block_len, sep)
    forget = pad_rows(record_ids(tok, [c.text for c in members]), sep)
    calib = calibration_blocks([cfg.domain, general], tok, cfg.calib_blocks, cfg.calib_len, seed=cfg.seed + 2)
    private_calib = pack_records(record_ids(tok, [c.text for c in members]), cfg.calib_len, sep)
    pretrain = None
    if cfg.model == "tiny":
        pretrain = token_blocks(general_docs, tok, cfg.block_len, cfg.pretrain_blocks, seed=cfg.seed + 3)
    return KillSwitchData(
        members, nonmembers, public, private, forget,
        domain_eval=token_blocks(domain_docs, tok, cfg.eval_len, cfg.eval_blocks, seed=cfg.seed + 1, split="heldout"),
        general_eval=token_blocks(general_docs, tok, cfg.eval_len, cfg.general_blocks, seed=cfg.seed + 1,
                                  split="heldout"),
        general_train=pretrain, calibration=calib, private_calibration=private_calib.input_ids,
        general_name=general, private_calibration_labels=private_calib.labels)


def _pre_key(cfg: KillSwitchConfig, data: KillSwitchData) -> dict[str, Any]:
    """What determines the model before fine-tuning (a file or alias, or the tiny pre-training run)."""
    if cfg.model != "tiny":
        return {"model": cfg.model}
    return {"model": "tiny", "arch": cfg.tiny_arch, "train": cfg.pretrain.__dict__, "general": data.general_name,
            "blocks": cfg.pretrain_blocks, "block_len": cfg.block_len, "seed": cfg.seed}


def _tiny_pre_loader(cfg: KillSwitchConfig, data: KillSwitchData, work: Path, fresh: bool,
                     log: Callable[[str], None]) -> tuple[Callable[[], nn.Module], dict[str, Any]]:
    """Pre-train the tiny byte-level Llama on the general corpus (cached) and return a loader of it."""
    assert data.general_train is not None

    def build() -> tuple[nn.Module, dict[str, Any]]:
        model = build_tiny_llama(seed=cfg.seed, **cfg.tiny_arch)
        tl = train(model, TokenRows.from_blocks(data.general_train), cfg.pretrain, desc="pre-train (general)")
        return model, {"wall_s": tl.wall_s, "steps": tl.steps, "tokens": tl.tokens, "final_loss": tl.losses[-1]}

    model, info = cached_model(work / "pre", _pre_key(cfg, data), build, fresh)
    log(f"pre-trained tiny model ({'reused' if info['reused'] else 'trained'}, {info['wall_s']:.0f} s)")
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def load() -> nn.Module:
        m = build_tiny_llama(seed=cfg.seed, **cfg.tiny_arch)
        m.load_state_dict(state)
        return m.eval()

    return load, info


def _finetuned(cfg: KillSwitchConfig, data: KillSwitchData, load_pre: Callable[[], nn.Module], work: Path,
               fresh: bool) -> tuple[nn.Module, dict[str, Any]]:
    rows = mixture(data.public, data.private, cfg.seed)

    def build() -> tuple[nn.Module, dict[str, Any]]:
        model = load_pre()
        tl = train(model, rows, cfg.finetune, desc="fine-tune (public + private)")
        return model, {"wall_s": tl.wall_s, "steps": tl.steps, "tokens": tl.tokens, "final_loss": tl.losses[-1]}

    key = {"stage": "finetune", "pre": _pre_key(cfg, data), "train": cfg.finetune.__dict__, "seed": cfg.seed,
           "data": [cfg.domain, cfg.public_blocks, cfg.block_len, cfg.canaries_per_kind, cfg.kinds, cfg.repeats,
                    cfg.digits_len]}
    return cached_model(work / "ft", key, build, fresh)


def _decomposed(ft: nn.Module, cfg: KillSwitchConfig, data: KillSwitchData, ortho: bool,
                method: str) -> tuple[nn.Module, dict[str, Any]]:
    """A decomposed copy of ``ft``: GPTQ base + ortho stream, or a base-only RTN model."""
    model = copy.deepcopy(ft)
    dcfg = DecomposeConfig(quant=replace(cfg.quant, method=method), select=cfg.select, ortho=ortho)
    sel = data.private_calibration if (ortho and cfg.select_calibration == "private") else None
    calib = data.calibration if method == "gptq" or ortho else None
    res = decompose(model, calib, dcfg, select_calibration=sel)
    from libortho.workflows import bits_summary

    return model, {"wall_s": res.stats["wall_s"], **bits_summary(res.base, res.ortho if ortho else None)}


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    import transformers

    from libortho.version import __version__, source_revision

    return {"libortho": __version__, "source": source_revision(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


class _Runner:
    """Holds the harness and collects one entry per evaluated method."""

    def __init__(self, harness: PrivacyHarness, console: Console, progress: bool) -> None:
        self.harness, self.console, self.progress = harness, console, progress
        self.methods: dict[str, dict[str, Any]] = {}

    def measure(self, name: str, model: nn.Module, label: str, group: str, cost: dict[str, Any] | None = None,
                **extra: Any) -> dict[str, Any]:
        metrics = self.harness.evaluate(model, progress=self.progress)
        self.methods[name] = {"label": label, "group": group, "metrics": metrics, "cost": cost or {}, **extra}
        m = metrics
        self.console.print(f"  [bold]{label:<28}[/] extraction {m['extraction']['rate']:.3f}  exposure "
                           f"{m['exposure']['mean']:6.2f}  ppl domain {m['ppl_domain']:8.3f}  general "
                           f"{m['ppl_general']:8.3f}  ({m['eval_s']:.0f} s)", highlight=False)
        return self.methods[name]


def _load_pre_and_tokenizer(cfg: KillSwitchConfig) -> tuple[Callable[[], nn.Module] | None, Any]:
    """(loader of the pre-fine-tuning model or None for tiny, tokenizer)."""
    if cfg.model == "tiny":
        from libortho.models import ByteTokenizer

        return None, ByteTokenizer()
    model, tok = load_model(cfg.model)
    if tok is None:
        raise ValueError(f"model {cfg.model!r} has no tokenizer: the experiment needs one")
    decoder_blocks(model)  # refuse unsupported layouts and GPT-2 Conv1D layers before any training
    refuse_conv1d(model)
    del model
    return (lambda: load_model(cfg.model)[0]), tok


def run_kill_switch(cfg: KillSwitchConfig, out_dir: str | Path, progress: bool = True, fresh: bool = False,
                    console: Console | None = None) -> dict[str, Any]:
    """Run the whole experiment; writes ``out_dir/result.json`` (atomically) and returns it."""
    console = console or Console(stderr=True)
    out, t0 = Path(out_dir), time.perf_counter()
    work = out / "models"
    say = lambda msg: console.print(f"[cyan]kill-switch[/] {msg}", highlight=False)  # noqa: E731
    torch.manual_seed(cfg.seed)
    load_pre, tok = _load_pre_and_tokenizer(cfg)
    data = build_data(cfg, tok)
    say(f"data: {len(data.members)} member / {len(data.nonmembers)} non-member canaries, "
        f"{data.public.tokens} public + {data.private.tokens} private training tokens, general={data.general_name}")
    stages: dict[str, Any] = {}
    if load_pre is None:
        load_pre, stages["pretrain"] = _tiny_pre_loader(cfg, data, work, fresh, say)
    harness = PrivacyHarness(tok, data.members, data.nonmembers, data.domain_eval, data.general_eval, cfg.harness)
    pre = load_pre()
    harness.set_reference(pre)
    run = _Runner(harness, console, progress)
    run.measure("pre", pre, "pre-fine-tune", "reference")
    del pre
    ft, ft_info = _finetuned(cfg, data, load_pre, work, fresh)
    stages["finetune"] = ft_info
    run.measure("ft", ft, "FP fine-tuned", "reference", ft_info)
    _quantized(run, ft, cfg, data, say)
    _unlearned(run, ft, cfg, data, load_pre, work, fresh, say)
    result = {"experiment": "kill_switch", "config": cfg.to_dict(), "environment": environment(),
              "data": data.describe(), "harness": harness.describe(), "stages": stages, "methods": run.methods,
              "alpha_sweep": [f"libortho_a{a:g}" for a in cfg.alphas], "wall_s": time.perf_counter() - t0}
    result["summary"] = summarise(result)
    atomic_write_json(out / RESULT_FILE, result)
    say(f"done in {result['wall_s'] / 60:.1f} min: {out / RESULT_FILE}")
    return result


def _quantized(run: _Runner, ft: nn.Module, cfg: KillSwitchConfig, data: KillSwitchData,
               say: Callable[[str], None]) -> None:
    """INT4 RTN (no ortho), then the LibOrtho decomposition swept over alpha.

    No separate base-only GPTQ model is measured: alpha = 0 runs the base stream alone, which is calibrated
    with the ortho stream off (the null test of ``bench/ppl_table.py`` checks that an independent base-only
    decomposition gives bit-identical logits).
    """
    say("INT4 RTN, base only")
    rtn, info = _decomposed(ft, cfg, data, ortho=False, method="rtn")
    run.measure("rtn_int4", rtn, f"INT4 RTN g{cfg.quant.group_size}", "quantized", info)
    del rtn
    say(f"LibOrtho: GPTQ base + {cfg.select.selector} ortho rho={cfg.select.rho:g} "
        f"(selector calibration: {cfg.select_calibration})")
    lo, info = _decomposed(ft, cfg, data, ortho=True, method="gptq")
    for a in cfg.alphas:
        set_alpha(lo, a)
        run.measure(f"libortho_a{a:g}", lo, f"LibOrtho alpha={a:g}", "libortho", info, alpha=a)


def _unlearned(run: _Runner, ft: nn.Module, cfg: KillSwitchConfig, data: KillSwitchData,
               load_pre: Callable[[], nn.Module], work: Path, fresh: bool, say: Callable[[str], None]) -> None:
    """Every unlearning baseline on the forget set (retrain is cached like the fine-tuned model)."""
    public_only = mixture(data.public, None, cfg.seed, n_private=len(data.private))
    task = UnlearnTask(forget=data.forget, retain=data.public, retrain_data=public_only,
                       retrain_config=cfg.finetune, load_pre=load_pre)
    for name in cfg.unlearning:
        say(f"unlearning baseline: {name}")
        if name == "retrain":
            def build(n: str = name) -> tuple[nn.Module, dict[str, Any]]:
                o = run_unlearning(n, ft, task, cfg.unlearn, progress=run.progress)
                return o.model, {"wall_s": o.wall_s, "steps": o.log["steps"], "tokens": o.log.get("tokens")}

            key = {"stage": "retrain", "pre": _pre_key(cfg, data), "train": cfg.finetune.__dict__, "seed": cfg.seed,
                   "data": [cfg.domain, cfg.public_blocks, cfg.block_len, len(data.private)]}
            model, info = cached_model(work / "retrain", key, build, fresh)
        else:
            o = run_unlearning(name, copy.deepcopy(ft), task, cfg.unlearn, progress=run.progress)
            model, info = o.model, {"wall_s": o.wall_s, "steps": o.log["steps"],
                                    "final_loss": o.log["losses"][-1] if o.log["losses"] else None}
        label = {"gradient_ascent": "Gradient ascent", "gradient_difference": "Gradient difference",
                 "npo": f"NPO (beta={cfg.unlearn.beta:g})", "retrain": "Retrain w/o private"}.get(name, name)
        run.measure(name, model, label, "unlearning", info)
        del model


@dataclass
class Benchmark:
    """The kill-switch benchmark ready for other experiments: its config, data, harness (reference model set),
    the fine-tuned model and a loader of the model before fine-tuning."""

    config: KillSwitchConfig
    data: KillSwitchData
    harness: PrivacyHarness
    ft: nn.Module
    ft_info: dict[str, Any]
    load_pre: Callable[[], nn.Module]


def benchmark_config(model: str, seed: int, overrides: dict[str, Any]) -> KillSwitchConfig:
    """The kill-switch preset of ``model`` at ``seed`` with ``overrides``, its model and corpora checked by name."""
    from libortho.experiments.config import check_inputs, preset

    cfg = replace(preset(model), seed=seed, **overrides)
    check_inputs(cfg)
    return cfg


def open_benchmark(cfg: KillSwitchConfig, out: Path, models_dir: str, label: str,
                   progress: bool) -> tuple[Benchmark, Path, Callable[[str], None]]:
    """:func:`prepare_benchmark` for an experiment writing to ``out``: (benchmark, models folder, progress printer)."""
    console = Console(stderr=True, quiet=not progress)
    say = lambda msg: console.print(f"[cyan]{label}[/] {msg}", highlight=False)  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)
    models = Path(models_dir) if models_dir else out / "models"
    return prepare_benchmark(cfg, models, say), models, say


def prepare_benchmark(cfg: KillSwitchConfig, models_dir: Path, say: Callable[[str], None]) -> Benchmark:
    """Data, harness and the fine-tuned model of ``cfg`` (trained once, cached under ``models_dir``)."""
    torch.manual_seed(cfg.seed)
    load_pre, tok = _load_pre_and_tokenizer(cfg)
    data = build_data(cfg, tok)
    if load_pre is None:
        load_pre, _ = _tiny_pre_loader(cfg, data, models_dir, False, say)
    harness = PrivacyHarness(tok, data.members, data.nonmembers, data.domain_eval, data.general_eval, cfg.harness)
    harness.set_reference(load_pre())
    ft, ft_info = _finetuned(cfg, data, load_pre, models_dir, False)
    say(f"fine-tuned model {'reused' if ft_info.get('reused') else 'trained'} ({ft_info['wall_s']:.0f} s)")
    return Benchmark(cfg, data, harness, ft, ft_info, load_pre)
