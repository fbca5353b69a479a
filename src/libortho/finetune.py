"""Fine-tune a model on a user's private records with a separation method and ship it as a decomposition.

:func:`finetune_and_save` is the Python API behind ``libortho finetune``: public text plus the
records of a JSONL file (:mod:`libortho.data.private`) train the shared weights and a memory
stream (:mod:`libortho.train.separation`); the shared weights become the INT-b GPTQ base stream
and the memory is stored in ``ortho.safetensors`` behind the alpha switch
(:func:`libortho.assemble.dual_stream`). Withholding ``ortho.safetensors`` is the kill switch, and
alpha = 0 is by construction the quantized shared model (the null test).

Every input is checked before the model is loaded; nothing is written unless the whole run
succeeds (the decomposition directory appears atomically, the report last). The manifest records
the records file's SHA-256, never the records' text. The optional privacy report is derived from
the private records and so is written outside the model directory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from libortho.workflows import check_out_dir, check_positive

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from libortho.config import QuantConfig
    from libortho.data.canaries import Canary, SecretSpace
    from libortho.data.private import PrivateRecord
    from libortho.data.records import TokenRows

EXPOSURE_NOTE = ("not computed: exposure needs a declared secret space (--secret-space ALPHABET:LENGTH); "
                 "records carry secrets, not their space")


@dataclass(frozen=True)
class FinetuneInputs:
    """What the checks read: the records (and non-members) and the records file's SHA-256."""

    records: list[PrivateRecord]
    nonmembers: list[PrivateRecord] | None
    records_sha256: str
    space: SecretSpace | None = None


def _check_sizes(sizes: dict[str, int | None], steps: int | None, epochs: float | None, lr: float) -> None:
    """Every count and length positive; ``steps`` and ``epochs`` not both; ``lr`` and ``epochs`` > 0."""
    for name, value in sizes.items():
        check_positive(name, value, 2 if name in ("block_len", "seq_len") else 1)
    check_positive("steps", steps)
    if steps is not None and epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if epochs is not None and not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")


def _check_records(path: Path, records: list[PrivateRecord], method: str, needs_labels: bool) -> None:
    """At least one record must be private (a label method trains on its private tokens)."""
    if not any(r.private for r in records):
        why = (f"method {method!r} reads private-token labels and" if needs_labels else "the memory")
        raise ValueError(f"{path} has no private record: {why} needs at least one record with a 'secret' "
                         "or 'private': true")


def _check_space(spec: str | None, report: Path | None, files: dict[Path, list[PrivateRecord]]
                 ) -> SecretSpace | None:
    """Parse ``--secret-space``; every private record's secret (members and non-members) must lie in it."""
    if spec is None:
        return None
    from libortho.data.canaries import SecretSpace

    if report is None:
        raise ValueError("--secret-space is used only by the privacy report: give --report FILE too")
    space = SecretSpace.parse(spec)
    for path, records in files.items():
        for i, r in enumerate(records, 1):
            if r.private and r.secret is not None and not space.contains(r.secret):
                raise ValueError(f"{path}: record {i} ({r.key}): its secret is not in the secret space {spec!r} "
                                 f"({space.n_free} characters of {space.alphabet!r})")
    return space


def _check_report(report: Path | None, out: Path, nonmembers: Path | None, overwrite: bool) -> None:
    """The report goes outside OUT, into no directory's place; --nonmembers only serves the report."""
    if report is None:
        if nonmembers is not None:
            raise ValueError("--nonmembers is used only by the privacy report: give --report FILE too")
        return
    rep, root = report.resolve(), out.resolve()
    if rep == root or root in rep.parents:
        raise ValueError(f"the report {report} is derived from the private records: write it outside OUT ({out})")
    if report.is_dir():
        raise IsADirectoryError(f"the report {report} is a directory: give a file path")
    if report.exists() and not overwrite:
        raise FileExistsError(f"the report {report} exists (use --overwrite to replace it)")


def check_finetune_inputs(out: Path, private: Path, public: list[str], method: str, *,
                          nonmembers: Path | None, report: Path | None, overwrite: bool,
                          sizes: dict[str, int | None], steps: int | None, epochs: float | None,
                          lr: float, secret_space: str | None = None) -> FinetuneInputs:
    """Refuse, before any model is loaded, every input the run would fail on; return what was read."""
    from libortho.atomic import sha256_file
    from libortho.data.corpora import check_source, load_corpus
    from libortho.data.private import read_records

    out = Path(out)
    check_out_dir(out, overwrite)
    _check_sizes(sizes, steps, epochs, lr)
    _check_report(report, out, nonmembers, overwrite)
    records = read_records(private)  # before the registry: it imports torch, a missing file answers at once
    from libortho.train.separation import SEPARATION

    needs_labels = bool(SEPARATION.entry(method).meta.get("needs_labels", True))
    _check_records(Path(private), records, method, needs_labels)
    if not public:
        raise ValueError("no public sources given: the shared weights need public text (--public)")
    for src in public:
        check_source(src)
        if not any(d.strip() for d in load_corpus(src)):
            raise ValueError(f"public source {src} is empty: nothing to train the shared weights on")
    others = None
    if nonmembers is not None:
        others = read_records(nonmembers)
        if not any(r.private for r in others):
            raise ValueError(f"{nonmembers} has no private record to serve as a non-member")
    files = {Path(private): records, **({Path(nonmembers): others} if nonmembers is not None and others else {})}
    space = _check_space(secret_space, report, files)
    return FinetuneInputs(records, others, sha256_file(private), space)


def training_rows(tok: Any, records: list[PrivateRecord], public: list[str], n_public_blocks: int,
                  block_len: int, repeats: int, seed: int) -> tuple[TokenRows, dict[str, int]]:
    """Public blocks (sequence ids from 2^62) and the packed records (``repeats`` copies), shuffled together."""
    from libortho.data import calibration_blocks
    from libortho.data.private import pack_private_records
    from libortho.data.records import TokenRows, mixture

    blocks = calibration_blocks(public, tok, n_blocks=n_public_blocks, block_len=block_len, seed=seed)
    pub = TokenRows.from_blocks(blocks, first_seq=1 << 62)
    priv = pack_private_records(tok, records, block_len, [repeats] * len(records), seed=seed)
    rows = mixture(pub, priv, seed)
    counts = {"records": len(records), "private_records": sum(r.private for r in records),
              "records_with_secret": sum(r.private and r.secret is not None for r in records),
              "repeats": repeats, "public_rows": len(pub), "private_rows": len(priv),
              "private_tokens": rows.private_tokens, "train_tokens": rows.tokens}
    return rows, counts


def finetune_and_save(model_spec: str, out: Path, private: Path, public: list[str], method: str, *,
                      nonmembers: Path | None = None, steps: int | None = None, epochs: float | None = None,
                      lr: float = 1e-4, batch_size: int = 8, block_len: int = 256, n_public_blocks: int = 256,
                      repeats: int = 1, bits: int = 4, group_size: int = 64, n_calib: int = 64,
                      seq_len: int = 256, seed: int = 0, bf16: bool = False, overwrite: bool = False,
                      progress: bool = True, report: Path | None = None,
                      show_secrets: bool = False, secret_space: str | None = None, fake_quant: float = 0.0,
                      ogd_gradient_energy: float | None = None) -> dict[str, Any]:
    """Fine-tune MODEL on public text + private records with ``method``, save the decomposition to OUT.

    ``fake_quant``: the last share of training runs on the base fake-quantized to the saved grid (``bits``,
    ``group_size``); ``ogd_gradient_energy``: ogd also projects off the public output-gradient subspace.

    Returns a JSON-able summary: counts, timings, bytes of base and memory, the out path (and the
    report's counts and rates when ``report`` is given; see :func:`privacy_report`).
    """
    from libortho.config import EXPERIMENT_GRID, QuantConfig

    t0 = time.perf_counter()
    out = Path(out)
    # the fake-quantized training's own grid (min-max, no act-order: SeparationConfig.fake_quant_config),
    # so the saved base is quantized on the grid the memory learned against
    quant = QuantConfig(bits=bits, group_size=group_size, **EXPERIMENT_GRID)
    sizes = {"batch_size": batch_size, "block_len": block_len, "n_public_blocks": n_public_blocks,
             "repeats": repeats, "n_calib": n_calib, "seq_len": seq_len}
    inputs = check_finetune_inputs(out, private, public, method, nonmembers=nonmembers, report=report,
                                   overwrite=overwrite, sizes=sizes, steps=steps, epochs=epochs, lr=lr,
                                   secret_space=secret_space)
    scfg = _separation_config(method, steps, epochs, lr, batch_size, bf16, seed, fake_quant=fake_quant,
                              fake_quant_bits=bits, fake_quant_group=group_size,
                              ogd_gradient_energy=ogd_gradient_energy)
    from libortho.models import load_model

    model, tok = load_model(model_spec, require_tokenizer=True)
    times = {"load_s": time.perf_counter() - t0}
    rows, counts = training_rows(tok, inputs.records, public, n_public_blocks, block_len, repeats, seed)
    shipped, trained, times2 = _train_and_assemble(model, tok, rows, scfg, public, quant, n_calib, seq_len, seed,
                                                   progress)
    times.update(times2)
    t1 = time.perf_counter()
    from libortho.checkpoint import save, split_state

    prov = {"source_model": model_spec, "records_sha256": inputs.records_sha256, "public": public,
            "counts": counts, "training": trained, "seed": seed}
    cfg = {"finetune": {"method": scfg.to_dict(), "block_len": block_len, "n_public_blocks": n_public_blocks,
                        "repeats": repeats, "calibration": {"n": n_calib, "seq_len": seq_len}},
           "quant": asdict(quant)}
    save(shipped, out, config=cfg, tokenizer=tok, provenance=prov, overwrite=overwrite)
    times["save_s"] = time.perf_counter() - t1
    from libortho.workflows import bits_summary

    base, memory, _ = split_state(shipped)
    summary: dict[str, Any] = {"out": str(out), "method": method, **counts, **times,
                               "train_wall_s": trained["wall_s"],
                               "base_bytes": (out / "base.safetensors").stat().st_size,
                               "memory_file_bytes": (out / "ortho.safetensors").stat().st_size,
                               **bits_summary(base, memory)}
    if report is not None:
        t2 = time.perf_counter()
        summary["report"] = write_privacy_report(report, out, inputs, show_secrets, overwrite)
        summary["report_s"] = time.perf_counter() - t2
    summary["total_s"] = time.perf_counter() - t0
    return summary


def _separation_config(method: str, steps: int | None, epochs: float | None, lr: float, batch_size: int,
                       bf16: bool, seed: int, fake_quant: float = 0.0, fake_quant_bits: int = 4,
                       fake_quant_group: int = 64, ogd_gradient_energy: float | None = None) -> Any:
    """The method's config with this run's schedule (epochs default 1 when no ``steps``); raises a
    ValueError naming a bad option before any model is loaded."""
    from libortho.train.loop import TrainConfig
    from libortho.train.separation import SeparationConfig

    train = TrainConfig(lr=lr, steps=steps, epochs=1.0 if epochs is None else epochs, batch_size=batch_size,
                        seed=seed, bf16=bf16)
    if ogd_gradient_energy is not None and method != "ogd":
        raise ValueError(f"--ogd-gradient-energy applies to method ogd only, not {method!r}")
    return SeparationConfig(method=method, train=train, seed=seed, fake_quant_fraction=fake_quant,
                            fake_quant_bits=fake_quant_bits, fake_quant_group=fake_quant_group,
                            ogd_gradient_energy=ogd_gradient_energy)


def _train_and_assemble(model: nn.Module, tok: Any, rows: TokenRows, scfg: Any, public: list[str],
                        quant: QuantConfig, n_calib: int, seq_len: int, seed: int,
                        progress: bool) -> tuple[nn.Module, dict[str, Any], dict[str, float]]:
    """Separate (train), then build the INT-b base of the shared model with the memory attached."""
    from libortho.assemble import dual_stream
    from libortho.data import calibration_blocks
    from libortho.train.separation import separate

    t0 = time.perf_counter()
    res = separate(model, rows, scfg, progress=progress)
    t1 = time.perf_counter()
    calib = calibration_blocks(public, tok, n_blocks=n_calib, block_len=seq_len, seed=seed + 1)
    shipped, stats = dual_stream(res.model, res.streams, calib, quant, alpha=1.0)
    trained = {**res.describe(), "quant_stats": stats}
    return shipped, trained, {"train_s": t1 - t0, "quantize_s": time.perf_counter() - t1}


# --- the privacy report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SecretPrompt:
    """What :func:`libortho.eval.extraction.extract` reads of a canary: the text before the secret, the secret."""

    prefix: str
    secret: str


def _private_nll(model: nn.Module, tok: Any, records: list[PrivateRecord]) -> list[float]:
    """Each private record's mean NLL over its private tokens (the secret; all of it without one)."""
    from libortho.data.private import secret_token_mask
    from libortho.data.records import record_ids, separator_id
    from libortho.eval.scoring import token_stats

    rows = record_ids(tok, [r.text for r in records])
    masks = secret_token_mask(tok, records)
    stats = token_stats(model, rows, separator_id(tok))
    out = []
    for lp, mask in zip(stats.logp, masks, strict=True):
        flags = [bool(f) for f in mask[1:]]
        out.append(float(-lp[flags].mean()))
    return out


def _as_canary(r: PrivateRecord, space: SecretSpace, member: bool) -> Canary:
    """A record with a secret as the canary the exposure code scores (text before and after the secret)."""
    from libortho.data.canaries import Canary

    at = r.text.find(cast(str, r.secret))
    return Canary("record", r.text[:at], cast(str, r.secret), r.text[at + len(cast(str, r.secret)):], 1, member,
                  space)


def _exposures(model: nn.Module, tok: Any, records: list[PrivateRecord], space: SecretSpace,
               member: bool) -> list[float]:
    """Exposure of every record's secret in ``space`` (exact up to 10^5 candidates, else estimated)."""
    from libortho.eval.exposure import canary_exposure

    return [canary_exposure(model, tok, _as_canary(r, space, member)).exposure
            for r in records if r.secret is not None]


def _measure(model: nn.Module, tok: Any, members: list[PrivateRecord], nonmembers: list[PrivateRecord] | None,
             space: SecretSpace | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Extraction, secret NLL, (with non-members) the loss-attack MIA and (with a secret space) exposure at
    the model's current alpha."""
    import numpy as np

    from libortho.eval.extraction import extract
    from libortho.eval.mia import roc_summary

    with_secret = [r for r in members if r.secret is not None]
    prompts = [_SecretPrompt(r.text[:r.text.find(r.secret)], r.secret) for r in with_secret if r.secret]
    ext = extract(model, tok, cast("list[Canary]", prompts)) if prompts else []
    nll = _private_nll(model, tok, members)
    res: dict[str, Any] = {"extraction": {"n": len(ext), "extracted": sum(e.extracted for e in ext),
                                          "rate": (sum(e.extracted for e in ext) / len(ext)) if ext else None},
                           "secret_nll_mean": float(np.mean(nll))}
    if nonmembers is not None:
        other = _private_nll(model, tok, nonmembers)
        res["mia_loss"] = roc_summary(-np.array(nll), -np.array(other))
        res["nonmember_nll_mean"] = float(np.mean(other))
    expo: list[float] = []
    if space is not None:
        expo = _exposures(model, tok, members, space, True)
        res["exposure"] = {"mean": float(np.mean(expo)) if expo else None, "n": len(expo),
                           "max_bits": space.size_log2, "method": "exact" if space.size <= 100_000 else "estimated"}
        if nonmembers is not None:
            control = _exposures(model, tok, nonmembers, space, False)
            res["exposure"]["nonmember_mean"] = float(np.mean(control)) if control else None
    by_key = {r.key: e for r, e in zip(with_secret, ext, strict=True)}
    by_expo = dict(zip([r.key for r in with_secret], expo, strict=True)) if expo else {}
    details = [{"id": r.key, "secret": r.secret, "secret_nll": v,
                "extracted": by_key[r.key].extracted if r.key in by_key else None,
                "generated": by_key[r.key].generated if r.key in by_key else None,
                "exposure": by_expo.get(r.key)}
               for r, v in zip(members, nll, strict=True)]
    return res, details


def privacy_report(out: Path, inputs: FinetuneInputs, show_secrets: bool = False) -> dict[str, Any]:
    """Privacy metrics of the saved-and-reloaded decomposition at alpha 0 and 1.

    Extraction (greedy from the text before each secret; records without a secret are skipped),
    the mean NLL of the private tokens, and with non-members a membership-inference loss attack
    (members vs non-members, scored on their private tokens). Counts and rates only, unless
    ``show_secrets`` adds per-record details (ids, secrets, generations). Exposure needs the secret
    space the user declared (``inputs.space``); without one it is left out.
    """
    from libortho.checkpoint import load
    from libortho.runtime import set_alpha

    members = [r for r in inputs.records if r.private]
    others = None if inputs.nonmembers is None else [r for r in inputs.nonmembers if r.private]
    model, tok = load(out, alpha=1.0)
    result: dict[str, Any] = {"records_sha256": inputs.records_sha256, "members": len(members),
                              "nonmembers": None if others is None else len(others),
                              "exposure": EXPOSURE_NOTE if inputs.space is None else
                              {"space": {"alphabet": inputs.space.alphabet, "length": inputs.space.n_free}},
                              "alphas": {}}
    details: dict[str, list[dict[str, Any]]] = {}
    for alpha in (0.0, 1.0):
        set_alpha(model, alpha)
        result["alphas"][f"{alpha:g}"], details[f"{alpha:g}"] = _measure(model, tok, members, others, inputs.space)
    if show_secrets:
        result["records"] = details
    return result


def write_privacy_report(path: Path, out: Path, inputs: FinetuneInputs, show_secrets: bool,
                         overwrite: bool) -> dict[str, Any]:
    """Compute :func:`privacy_report` and write it atomically to ``path``; returns it without per-record details."""
    import json

    from libortho.atomic import atomic_write_text, json_default

    rep = privacy_report(out, inputs, show_secrets)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"the report {path} exists (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(rep, indent=1, default=json_default) + "\n")
    return {k: v for k, v in rep.items() if k != "records"}
