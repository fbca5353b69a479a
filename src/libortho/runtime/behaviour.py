"""The behaviour switch at run time: a projection hook on each site's output, with its own alpha.

:func:`attach_behaviour` gives every site module (an ``nn.Linear``, an :class:`OrthoLinear`, an
embedding...) a child named ``behaviour`` (:class:`BehaviourProjection`) and one forward hook that
returns ``y - alpha_b * strength * u (u^T y)``. The switch is independent of the memory streams'
alpha: :func:`set_behaviour_alpha` touches only behaviour modules, and ``set_alpha`` (ortho) never
touches them. At ``alpha_b == 0`` the hook returns the module's own output tensor, so logits are
bit-identical to the unedited model. The hook is a module-level function that finds the projection
through its module, so ``copy.deepcopy`` and ``.to()`` keep it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from libortho.runtime.switch import AlphaSwitch
from libortho.streams.behaviour import BehaviourEdit, BehaviourStream

BEHAVIOUR_CHILD = "behaviour"
_HOOK_ATTR = "_libortho_behaviour_hook"
WITHHELD_MESSAGE = "the behaviour stream of this model was not loaded (withheld): it is locked at alpha_b = 0"


def _out_width(module: nn.Module) -> int | None:
    """The width of a site's output (``out_features`` of a linear, ``embedding_dim`` of an embedding)."""
    for attr in ("out_features", "embedding_dim"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    return None


class BehaviourProjection(AlphaSwitch, nn.Module):
    """One site's edit as a module: ``project(y) = y - alpha * strength * u (u^T y)`` in fp32.

    ``u`` is a non-persistent buffer (``state_dict`` holds nothing of the stream; saving goes through
    :func:`behaviour_stream`). ``edit=None`` is the withheld state: locked at alpha 0.
    """

    locked_message = WITHHELD_MESSAGE
    switch_name = "alpha_b"

    def __init__(self, edit: BehaviourEdit | None, alpha: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("u", None if edit is None else edit.direction.clone(), persistent=False)
        self.strength = 1.0 if edit is None else float(edit.strength)
        self._alpha = 0.0
        self.alpha = alpha if edit is not None else 0.0

    @property
    def locked(self) -> bool:
        return self.u is None

    def _apply(self, fn: Any, recurse: bool = True) -> BehaviourProjection:
        """``.to(device)`` moves the direction; a dtype change (``model.to(torch.bfloat16)``) leaves it fp32."""
        u = self.u
        super()._apply(fn, recurse)
        if u is not None and self.u is not None and self.u.dtype != torch.float32:
            self.u = u.to(device=self.u.device, dtype=torch.float32)
        return self

    def edit(self) -> BehaviourEdit | None:
        """The stored edit (direction and strength), or None when withheld."""
        return None if self.u is None else BehaviourEdit(self.u.detach().float().clone(), self.strength)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` with ``alpha * strength`` of its component along ``u`` removed (``y`` itself at alpha 0)."""
        if self._alpha == 0.0 or self.u is None:
            return y
        u = self.u.to(device=y.device, dtype=torch.float32)
        y32 = y.float()
        coef = (y32 @ u) * (self._alpha * self.strength)
        return (y32 - coef.unsqueeze(-1) * u).to(y.dtype)

    def extra_repr(self) -> str:
        what = "withheld (locked)" if self.u is None else f"dim={self.u.numel()}, strength={self.strength:g}"
        return f"{what}, alpha_b={self._alpha:g}"


def _behaviour_hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
    """Forward hook of a site: its output through its ``behaviour`` child (untouched at alpha 0)."""
    proj = module._modules.get(BEHAVIOUR_CHILD)
    if not isinstance(proj, BehaviourProjection) or proj.alpha == 0.0:
        return out
    if not isinstance(out, torch.Tensor):
        raise RuntimeError(f"{type(module).__name__} returned {type(out).__name__}: a behaviour site must "
                           "return one tensor")
    return proj(out)


def _site(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"behaviour site {name!r} is not a module of this model") from None


def attach_behaviour(model: nn.Module, stream: BehaviourStream | None, alpha: float = 1.0,
                     sites: list[str] | None = None) -> int:
    """Attach ``stream``'s edits (one child + one hook per site); returns the number of sites.

    Attaching again replaces a site's edit. ``stream=None`` with ``sites`` attaches locked (withheld)
    projections there. Every site is checked (exists, output width matches) before any is touched.
    """
    if stream is None and not sites:
        raise ValueError("attach_behaviour needs a stream or, for a withheld one, the site names")
    plan: dict[str, BehaviourEdit | None] = dict(stream.edits) if stream is not None else dict.fromkeys(sites or [])
    modules = {}
    for name, edit in plan.items():
        mod = _site(model, name)
        width = _out_width(mod)
        if edit is not None and width is not None and width != edit.dim:
            raise ValueError(f"behaviour site {name!r} writes {width} features, its direction has {edit.dim}")
        child = mod._modules.get(BEHAVIOUR_CHILD)
        if child is not None and not isinstance(child, BehaviourProjection):
            raise ValueError(f"{name!r} already has a child {BEHAVIOUR_CHILD!r} of type {type(child).__name__}")
        modules[name] = mod
    for name, edit in plan.items():
        mod = modules[name]
        proj = BehaviourProjection(edit, alpha=alpha if edit is not None else 0.0)
        if mod._modules.get(BEHAVIOUR_CHILD) is None:
            setattr(mod, _HOOK_ATTR, mod.register_forward_hook(_behaviour_hook).id)
        mod.add_module(BEHAVIOUR_CHILD, proj)
    if stream is not None:
        model._libortho_behaviour_info = dict(stream.info)  # noqa: SLF001  (read back by behaviour_stream)
    return len(plan)


def behaviour_sites(model: nn.Module) -> dict[str, BehaviourProjection]:
    """Every attached projection keyed by its site's qualified name."""
    return {name.rpartition(".")[0]: m for name, m in model.named_modules() if isinstance(m, BehaviourProjection)}


def remove_behaviour(model: nn.Module) -> int:
    """Take every behaviour projection (child and hook) off ``model``; returns how many sites had one."""
    sites = behaviour_sites(model)
    for name in sites:
        mod = model.get_submodule(name)
        hook_id = getattr(mod, _HOOK_ATTR, None)
        for table in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            getattr(mod, table, {}).pop(hook_id, None)
        if hasattr(mod, _HOOK_ATTR):
            delattr(mod, _HOOK_ATTR)
        del mod._modules[BEHAVIOUR_CHILD]
    return len(sites)


def set_behaviour_alpha(model: nn.Module, alpha: float) -> int:
    """Set alpha_b on every behaviour site (all or nothing: a withheld site refuses alpha != 0)."""
    sites = behaviour_sites(model)
    if not sites:
        raise ValueError("no behaviour stream is attached to this model")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha_b must be finite, got {alpha}")
    if alpha != 0.0 and any(p.locked for p in sites.values()):
        raise RuntimeError(WITHHELD_MESSAGE)
    for p in sites.values():
        p.alpha = alpha
    return len(sites)


def behaviour_stream(model: nn.Module, info: dict[str, Any] | None = None) -> BehaviourStream | None:
    """The attached (not withheld) edits as a :class:`BehaviourStream` (``info``: given, else the attached
    stream's), or None when there are none."""
    edits = {n: e for n, p in behaviour_sites(model).items() if (e := p.edit()) is not None}
    if info is None:
        info = getattr(model, "_libortho_behaviour_info", {})
    return BehaviourStream(edits, dict(info)) if edits else None


@contextmanager
def behaviour_scope(model: nn.Module, alpha: float) -> Iterator[nn.Module]:
    """Temporarily set alpha_b on every behaviour site; the previous values come back on exit."""
    sites = behaviour_sites(model)
    before = {n: p.alpha for n, p in sites.items()}
    set_behaviour_alpha(model, alpha)
    try:
        yield model
    finally:
        for n, p in sites.items():
            p._alpha = before[n]  # noqa: SLF001  (restoring values that passed the setter before)
