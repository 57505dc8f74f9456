"""Int8 dynamic quantization of a frozen classifier for CPU scoring, and how precise a scorer is.

Only frozen scorers (the reward, a judge) are quantized, never the policy: PPO's exactness (KL 0
and ratio 1 at the first step, exact resume) is about the policy's float32 log-probs.

`torch.ao.quantization.quantize_dynamic` replaces each `nn.Linear` with one that keeps int8
weights (one scale per output channel) and quantizes its input per call (uint8, one scale per
tensor); the matrix multiply runs in integers (fbgemm/oneDNN), the output in float32. torch
marks `torch.ao.quantization` deprecated in favour of torchao (its warning says "will be removed
in 2.10"; it is still there and working in 2.13, as are the quantized tensors it builds on, also
marked deprecated): we silence those warnings here, and `quantize_linear_int8` is the one place
to change when it goes.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

Quantize = Literal["none", "int8"]
QUANTIZE_CHOICES = ("none", "int8")
INT8_DYNAMIC = "int8-dynamic"


def quantize_linear_int8(module: nn.Module) -> nn.Module:
    """`module` with every `nn.Linear` dynamically quantized to int8 (in place; CPU only).

    Per-channel weight scales: on a random-weight RoBERTa-base they lower the largest logit change
    of per-tensor scales (0.021 vs 0.028) at the same speed.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization -> torchao, see above
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*deprecated", category=UserWarning)
        return quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def has_int8_linear(module: nn.Module) -> bool:
    """Whether any layer of `module` is a dynamically quantized Linear."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return any(isinstance(m, DynamicLinear) for m in module.modules())


def describe_precision(scorer: nn.Module | None) -> str | None:
    """The arithmetic a reward or judge scores with, for reports: e.g. `float32`, `int8-dynamic`.

    A scorer that knows (`HFClassifierReward.precision`) says; a combination lists its parts;
    anything else (a scikit-learn judge, a Python function) is `unquantized`. None for None.
    """
    if scorer is None:
        return None
    if isinstance(getattr(scorer, "precision", None), str):
        return scorer.precision
    components = getattr(scorer, "components", None)
    if components is not None:
        return "+".join(describe_precision(c) or "unquantized" for c in components)
    return "unquantized"


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two (N,) score vectors (ties broken by order; float64)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return x.double().argsort(stable=True).argsort().double()

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
