"""Putting OrthoLinear layers into a model and switching alpha at run time."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from libortho.runtime.linear import OrthoLinear


def replace_module(model: nn.Module, qualified_name: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at ``qualified_name`` (e.g. ``model.layers.0.mlp.up_proj``); returns the old one."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def ortho_layers(model: nn.Module) -> dict[str, OrthoLinear]:
    """All OrthoLinear layers by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, OrthoLinear)}


def set_alpha(model: nn.Module, alpha: float, pattern: str | None = None) -> int:
    """Set alpha on every OrthoLinear (or those whose name matches regex ``pattern``); returns the count."""
    rx = re.compile(pattern) if pattern else None
    n = 0
    for name, layer in ortho_layers(model).items():
        if rx is None or rx.search(name):
            layer.alpha = alpha
            n += 1
    if n == 0:
        raise ValueError("no OrthoLinear layer matched" + (f" pattern {pattern!r}" if pattern else ""))
    return n


def get_alpha(model: nn.Module) -> dict[str, float]:
    """Current alpha of every OrthoLinear layer."""
    return {n: m.alpha for n, m in ortho_layers(model).items()}


@contextmanager
def alpha_scope(model: nn.Module, alpha: float, pattern: str | None = None) -> Iterator[nn.Module]:
    """Temporarily set alpha; the previous per-layer values come back on exit."""
    before = get_alpha(model)
    try:
        set_alpha(model, alpha, pattern)
        yield model
    finally:
        layers = ortho_layers(model)
        for name, a in before.items():
            layers[name]._alpha = a
