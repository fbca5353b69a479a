"""The ``libortho ablate`` workflow: two prompt files in, an edited model (or a behaviour stream) out.

Set A shows the behaviour, set B does not. Each is split into a direction part and a held-out part
(by the ``template`` field when the prompts carry one, so no held-out prompt shares a template with
the prompts that found the direction; else at random). The direction is the seed's aggregate over
``l >= min_fraction * L`` (or one layer's own); the edit goes into the weights (an ordinary Hugging
Face checkpoint) or, with ``stream=True``, into a behaviour stream beside the unedited weights (or
inside a saved decomposition, whose weights are quantized). Before/after figures on the held-out
parts are written to ``ablation.json`` in the output and returned.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

from libortho.atomic import atomic_directory, atomic_write_json
from libortho.data.prompts import Prompt, read_prompts
from libortho.manifest import MANIFEST

REPORT = "ablation.json"


def split_prompts(a: list[Prompt], b: list[Prompt], held_out_fraction: float, seed: int
                  ) -> tuple[list[str], list[str], list[str], list[str]]:
    """(direction A, held-out A, direction B, held-out B), split jointly so the two sets stay matched.

    When every prompt names a template, whole templates are held out, chosen once from the union of
    A's and B's templates (a held-out template is in neither set's direction part); otherwise matched
    sets of equal length are split by one shuffled index list, and unequal ones row by row.
    """
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    rng = random.Random(seed)
    both = a + b
    templates = sorted({p.template for p in both})
    if all(p.template for p in both) and len(templates) >= 2:
        k = min(len(templates) - 1, max(1, round(held_out_fraction * len(templates))))
        held_t = set(rng.sample(templates, k))
        out = []
        for side in (a, b):
            out += [[p.text for p in side if p.template not in held_t], [p.text for p in side if p.template in held_t]]
        if not all(out):
            raise ValueError("holding out whole templates left a set without direction or held-out prompts: "
                             "give each set prompts of several templates (or drop the template field)")
        return out[0], out[1], out[2], out[3]
    if min(len(a), len(b)) < 2:
        raise ValueError("a prompt set needs at least 2 prompts (one to find the direction, one to check it)")
    out = []
    order = list(range(max(len(a), len(b))))
    rng.shuffle(order)
    for side in (a, b):
        idx = [i for i in order if i < len(side)]
        k = min(len(side) - 1, max(1, round(held_out_fraction * len(side))))
        held = set(idx[:k])
        out += [[p.text for i, p in enumerate(side) if i not in held],
                [p.text for i, p in enumerate(side) if i in held]]
    return out[0], out[1], out[2], out[3]


def _is_decomposition(spec: str) -> bool:
    return (Path(spec) / MANIFEST).is_file()


def check_ablate_inputs(model: str, with_path: Path, without_path: Path, out: Path, stream: bool,
                        overwrite: bool, strength: float, min_fraction: float) -> tuple[list[Prompt], list[Prompt]]:
    """Every refusal that needs no model: prompt files, numbers, output directory, weight form on a decomposition."""
    from libortho.workflows import check_out_dir

    check_out_dir(out, overwrite)
    if not strength > 0:
        raise ValueError(f"--strength must be > 0, got {strength}")
    if not 0 <= min_fraction < 1:
        raise ValueError(f"--min-fraction must be in [0, 1), got {min_fraction}")
    if _is_decomposition(model) and not stream:
        raise ValueError(f"{model} is a saved decomposition (quantized weights): use --stream to add a behaviour "
                         "stream beside its base and ortho streams")
    return read_prompts(with_path), read_prompts(without_path)


def _figures(model: Any, tok: Any, a: list[str], b: list[str], markers: tuple[str, ...], tokens: int) -> dict:
    from libortho.eval.behaviour import greedy_continuations, marker_hits

    ha = marker_hits(greedy_continuations(model, tok, a, tokens), markers)
    hb = marker_hits(greedy_continuations(model, tok, b, tokens), markers)
    return {"behaviour_rate": sum(ha) / len(ha), "false_behaviour_rate": sum(hb) / len(hb), "n_a": len(a),
            "n_b": len(b)}


def _load(spec: str) -> tuple[Any, Any]:
    if _is_decomposition(spec):
        from libortho.checkpoint import load

        return load(spec)
    from libortho.models.load import load_model

    return load_model(spec, require_tokenizer=True)


def ablate_and_save(model_spec: str, with_path: Path, without_path: Path, out: Path, stream: bool = False,
                    strength: float = 1.0, min_fraction: float = 0.7, direction_layer: int | None = None,
                    positions: str = "last", per_layer: bool = False, held_out_fraction: float = 0.25,
                    markers: tuple[str, ...] | None = None,
                    eval_tokens: int = 24, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Find the direction, edit, measure before/after on held-out prompts, save; returns the summary."""
    if positions not in ("last", "post_instruction"):
        raise ValueError(f"--positions must be last or post_instruction, got {positions!r}")
    if per_layer and direction_layer is not None:
        raise ValueError("give --per-layer or --direction-layer, not both")
    if direction_layer is not None and direction_layer < 0:
        raise ValueError(f"--direction-layer must be >= 0, got {direction_layer}")
    pa, pb = check_ablate_inputs(model_spec, with_path, without_path, out, stream, overwrite, strength, min_fraction)
    dir_a, held_a, dir_b, held_b = split_prompts(pa, pb, held_out_fraction, seed)
    import torch

    from libortho.behaviour_io import BEHAVIOUR_MANIFEST, BEHAVIOUR_TENSORS, write_behaviour
    from libortho.edit.ablate import apply_weight_edit, behaviour_stream_for
    from libortho.edit.directions import decoder_layers, find_directions
    from libortho.eval.behaviour import DEFAULT_MARKERS
    from libortho.runtime.behaviour import attach_behaviour, remove_behaviour

    markers = tuple(markers or DEFAULT_MARKERS)
    model, tok = _load(model_spec)
    if tok is None:
        raise FileNotFoundError(f"{model_spec} has no usable tokenizer: ablate needs one to read the prompts")
    remove_behaviour(model)  # a stream already saved with the source is not part of the model the edit reads
    n = len(decoder_layers(model))
    if direction_layer is not None and direction_layer >= n:
        raise ValueError(f"--direction-layer must be in 0..{n - 1}, got {direction_layer}")
    dirs = find_directions(model, tok, dir_a, dir_b, min_fraction, positions)  # type: ignore[arg-type]
    u: Any = dirs.direction if direction_layer is None else dirs.layer_direction(direction_layer)
    if per_layer:
        u = {layer: dirs.layer_direction(layer) for layer in dirs.layers}
    info = {"method": "difference of means", "positions": positions, "aggregation_layers": list(dirs.layers),
            "direction_layer": direction_layer, "per_layer": per_layer, "scores": dirs.scores, "with": str(with_path),
            "without": str(without_path), "n_direction": [len(dir_a), len(dir_b)]}
    edit = behaviour_stream_for(model, u, dirs.layers, strength, info=info)
    before = _figures(model, tok, held_a, held_b, markers, eval_tokens)
    attach_behaviour(model, edit)
    after = _figures(model, tok, held_a, held_b, markers, eval_tokens)
    summary = {"model": model_spec, "form": "stream" if stream else "weights", "edited_sites": len(edit.edits),
               "layers": list(dirs.layers), "strength": strength, "held_out": {"before": before, "after": after},
               "markers": list(markers), "out": str(out)}
    with atomic_directory(out) as tmp:
        if _is_decomposition(model_spec):  # its files as they are (manifest, config, provenance), plus the stream
            shutil.copytree(model_spec, tmp, dirs_exist_ok=True)
            for old in (BEHAVIOUR_TENSORS, BEHAVIOUR_MANIFEST, REPORT):
                (tmp / old).unlink(missing_ok=True)
            write_behaviour(tmp, edit, {"source": model_spec})
        else:
            remove_behaviour(model)
            if not stream:
                apply_weight_edit(model, edit)
            with torch.no_grad():
                model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if stream:
                write_behaviour(tmp, edit, {"source": model_spec})
        atomic_write_json(tmp / REPORT, summary)
    return summary
