"""Randomised rounding on a group-wise grid: the sensitive regions' quantizer of geometry-aware quantization.

Seed 004 proposes quantizing the regions that carry memorised detail coarsely *and* at random, so what
is left of a record in them is noise rather than a rounded copy. :func:`dithered_quantize` rounds
``W / s + z + noise * xi`` with ``xi ~ U(-1/2, 1/2)`` drawn per entry from an explicit generator:

* ``noise = 0`` is round-to-nearest (bit for bit :func:`libortho.quant.rtn.rtn_quantize`);
* ``noise = 1`` is stochastic rounding, unbiased for entries inside the grid: ``E[Q] = W``;
* ``noise > 1`` adds dither beyond a step, the privacy knob (the error variance grows as ``noise^2 / 12``
  steps squared plus the rounding's). Unbiasedness holds at integer ``noise`` only (uniform dither's
  characteristic function vanishes at the integers); at other values a small bias remains.

The grid is the configuration's own (fit on ``W``); codes are clamped to ``[0, 2^b - 1]``.
"""

from __future__ import annotations

import time

import torch

from libortho.config import QuantConfig
from libortho.quant.grid import QuantResult, check_weight, fit_grid
from libortho.streams.base import expand_groups


def dithered_quantize(W: torch.Tensor, cfg: QuantConfig, noise: float, generator: torch.Generator) -> QuantResult:
    """Quantize ``W`` on ``cfg``'s grid, rounding after adding ``noise`` steps of uniform dither."""
    check_weight(W)
    if not noise >= 0:  # also refuses NaN
        raise ValueError(f"noise must be >= 0 (in grid steps), got {noise}")
    t0 = time.perf_counter()
    Wf = W.detach().float()
    scales, zeros = fit_grid(Wf, cfg)
    d_in = Wf.shape[1]
    s, z = expand_groups(scales, d_in, cfg.group_size), expand_groups(zeros, d_in, cfg.group_size)
    x = Wf / s + z
    if noise > 0:
        xi = torch.rand(Wf.shape, generator=generator, dtype=torch.float32) - 0.5
        x = x + noise * xi
    codes = torch.clamp(torch.round(x), 0, 2**cfg.bits - 1)
    return QuantResult(codes.to(torch.uint8), scales, zeros, cfg.bits, cfg.group_size,
                       {"method": "dither", "noise": noise, "time_s": time.perf_counter() - t0})
