"""Putting OrthoLinear layers into a model and switching alpha at run time."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from libortho.runtime.linear import LOCKED_MESSAGE, OrthoLinear


def replace_module(model: nn.Module, qualified_name: str, new_module: nn.Module) -> nn.Module:
    """Swap the submodule at ``qualified_name`` (e.g. ``model.layers.0.mlp.up_proj``); returns the old one."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child not in parent._modules:
        raise AttributeError(f"{type(parent).__name__} at {parent_name or '<root>'!r} has no submodule {child!r}")
    old = parent._modules[child]
    setattr(parent, child, new_module)
    return old


def ortho_layers(model: nn.Module) -> dict[str, OrthoLinear]:
    """All OrthoLinear layers of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, OrthoLinear)}


def _select(model: nn.Module, pattern: str | None) -> dict[str, OrthoLinear]:
    """OrthoLinear layers whose qualified name matches regex ``pattern`` (``re.search``); all if None."""
    layers = ortho_layers(model)
    if pattern is not None:
        rx = re.compile(pattern)
        layers = {n: m for n, m in layers.items() if rx.search(n)}
    if not layers:
        raise ValueError("no OrthoLinear layer" + (f" matches pattern {pattern!r}" if pattern else " in model"))
    return layers


def set_alpha(model: nn.Module, alpha: float, pattern: str | None = None) -> int:
    """Set alpha on every OrthoLinear (or those matching ``pattern``); returns how many were set.

    All-or-nothing: if alpha != 0 and any selected layer is locked (ortho not loaded), nothing changes
    and a RuntimeError is raised. Raises ValueError when no layer is selected (a typo is not silent).
    """
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    layers = _select(model, pattern)
    if alpha != 0.0:
        locked = [n for n, m in layers.items() if m.locked]
        if locked:
            raise RuntimeError(f"{LOCKED_MESSAGE}; {len(locked)} layer(s), e.g. {locked[0]!r}")
    for layer in layers.values():
        layer.alpha = alpha
    return len(layers)


def get_alpha(model: nn.Module) -> dict[str, float]:
    """Current alpha of every OrthoLinear layer by qualified name."""
    return {n: m.alpha for n, m in ortho_layers(model).items()}


@contextmanager
def alpha_scope(model: nn.Module, alpha: float, pattern: str | None = None) -> Iterator[nn.Module]:
    """Temporarily set alpha (as :func:`set_alpha`); every layer's previous alpha comes back on exit."""
    before = get_alpha(model)
    set_alpha(model, alpha, pattern)
    try:
        yield model
    finally:
        layers = ortho_layers(model)
        for name, a in before.items():
            layer = layers.get(name)
            if layer is not None:
                layer.alpha = 0.0 if layer.locked else a  # a layer detached inside the scope stays at 0
