"""Configuration of the privacy kill-switch experiment, with presets for the two test beds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from libortho.config import EXPERIMENT_GRID, QuantConfig, SelectConfig
from libortho.data.canaries import KINDS
from libortho.eval.harness import HarnessConfig
from libortho.train.loop import TrainConfig
from libortho.train.unlearn import UNLEARNING, UnlearnConfig

SelectCalibration = Literal["public", "private"]
TINY_ARCH = {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 512}


@dataclass(frozen=True)
class KillSwitchConfig:
    """Every knob of the kill-switch experiment (seed 002 §5.2).

    model: ``tiny`` (a small byte-level Llama pre-trained inside the run on the general corpus),
    ``smollm2-135m``, or a local Hugging Face directory / GGUF file. domain: the public fine-tuning
    corpus; general: a second corpus for "general capability" perplexity (and the tiny model's
    pre-training). The fine-tuning mixture is ``public_blocks`` blocks of the domain plus every
    member record ``repeats`` times. The base stream is calibrated on public text (domain + general);
    ``select_calibration = "private"`` lets the selector score with the private records' curvature.
    """

    model: str = "tiny"
    domain: str = "shakespeare"
    general: str = "auto"
    seed: int = 0
    block_len: int = 256
    public_blocks: int = 960
    eval_len: int = 256
    eval_blocks: int = 16
    general_blocks: int = 16
    canaries_per_kind: int = 4
    kinds: tuple[str, ...] = KINDS
    repeats: tuple[int, ...] = (1, 4, 16)
    digits_len: int = 4
    tiny_arch: dict[str, int] = field(default_factory=lambda: dict(TINY_ARCH))
    pretrain_blocks: int = 4800
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, steps=300, batch_size=16,
                                                                      weight_decay=0.1, warmup=0.05))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, epochs=4.0, batch_size=16,
                                                                      warmup=0.05))
    unlearn: UnlearnConfig = field(default_factory=lambda: UnlearnConfig(steps=20, lr=1e-4, batch_size=8,
                                                                         retain_batch_size=8))
    unlearning: tuple[str, ...] = ("gradient_ascent", "gradient_difference", "npo", "retrain")
    quant: QuantConfig = field(default_factory=lambda: QuantConfig(bits=4, group_size=64, method="gptq",
                                                                   **EXPERIMENT_GRID))
    # obs, as in the committed SmolLM2 runs (the library default is now diag; see docs/results/dual_stream_smollm2)
    select: SelectConfig = field(default_factory=lambda: SelectConfig(selector="obs", rho=0.01))
    select_calibration: SelectCalibration = "public"
    calib_blocks: int = 32
    calib_len: int = 256
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    harness: HarnessConfig = field(default_factory=lambda: HarnessConfig(exposure_samples=64))

    def __post_init__(self) -> None:
        unknown = [m for m in self.unlearning if m not in UNLEARNING]
        if unknown:
            raise ValueError(f"unknown unlearning method(s) {unknown}; registered: {sorted(UNLEARNING)}")
        if self.select_calibration not in ("public", "private"):
            raise ValueError(f"select_calibration must be 'public' or 'private', got {self.select_calibration!r}")
        bad = [a for a in self.alphas if not isinstance(a, int | float) or isinstance(a, bool) or not 0 <= a <= 1]
        if not self.alphas or bad:
            raise ValueError(f"alphas must be a non-empty list of values in [0, 1] (the privacy switch), got {bad}")
        for name in ("block_len", "public_blocks", "eval_len", "eval_blocks", "general_blocks", "calib_blocks",
                     "calib_len", "canaries_per_kind", "pretrain_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_len < 2 or self.block_len < 2:
            raise ValueError("block lengths must be >= 2")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KillSwitchConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        nested = {"pretrain": TrainConfig, "finetune": TrainConfig, "unlearn": UnlearnConfig,
                  "quant": QuantConfig, "select": SelectConfig, "harness": HarnessConfig}
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown kill-switch config keys {sorted(extra)}")
        kw: dict[str, Any] = {}
        try:
            for k, v in d.items():
                if k in nested:
                    if not isinstance(v, dict):
                        raise ValueError(f"kill-switch config key {k!r} must be an object of fields, got {v!r}")
                    v = dict(v)
                    if "betas" in v:
                        v["betas"] = tuple(v["betas"])
                    kw[k] = nested[k](**v)
                elif k in ("kinds", "repeats", "unlearning", "alphas"):
                    if not isinstance(v, list | tuple):
                        raise ValueError(f"kill-switch config key {k!r} must be a list, got {v!r}")
                    kw[k] = tuple(v)
                else:
                    kw[k] = v
            return cls(**kw)
        except TypeError as err:  # an unknown nested field, or a value of the wrong type
            raise ValueError(f"invalid kill-switch config: {err}") from err


def preset(model: str) -> KillSwitchConfig:
    """The default configuration for ``model``: the tiny demo, SmolLM2-135M, or any local model.

    The tiny byte-level model, pre-trained for a few minutes, memorises slowly: records seen 16
    times in 4 epochs are not extractable (measured), so the demo inserts members 4, 16 and 64
    times. Pre-trained models memorise far faster and use the issue's (1, 4, 16), over two epochs
    (in one epoch SmolLM2-135M extracted 1 of 24 canaries: too little signal to measure a switch).
    """
    if model == "tiny":
        return KillSwitchConfig(repeats=(4, 16, 64))
    return KillSwitchConfig(
        model=model, repeats=(1, 4, 16), block_len=128, public_blocks=320, eval_len=256, eval_blocks=16,
        general_blocks=16, digits_len=3,
        finetune=TrainConfig(lr=2e-4, epochs=2.0, batch_size=8, warmup=0.05),
        unlearn=UnlearnConfig(steps=20, lr=2e-5, batch_size=8, retain_batch_size=4),
        calib_blocks=32, calib_len=256,
        harness=HarnessConfig(exposure_samples=64, batch_size=8))


def check_inputs(cfg: KillSwitchConfig) -> None:
    """Refuse, before any training, a model or corpus that does not exist (names only: nothing is loaded)."""
    from libortho.data.corpora import check_source
    from libortho.models.load import ALIASES

    if cfg.model not in ALIASES and not Path(cfg.model).expanduser().exists():
        raise FileNotFoundError(f"model {cfg.model!r} not found: give one of {', '.join(ALIASES)}, a local Hugging "
                                "Face directory or a .gguf file")
    for source in (cfg.domain, *(() if cfg.general == "auto" else (cfg.general,))):
        check_source(source)


def with_overrides(cfg: KillSwitchConfig, **kw: Any) -> KillSwitchConfig:
    """``cfg`` with the given top-level fields replaced (None values are ignored)."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
