"""Three exact ways to make sampling cheaper on CPU: the LoRA merged into its base weights for the
rollout, the decoding steps' few-row matmuls in the layout the CPU's BLAS runs fastest, and
inverse-CDF sampling instead of `torch.multinomial`. The module uses all three under
`generation.fast_sampling: true` (`RLDetoxModule.sample`, hence the evaluation too).

None changes what is sampled from: merged weights and the transposed matmuls compute the same
logits up to float32 rounding (log-probs of the sampled tokens within 1e-5 of the unmerged
forward's, as the unmerged `generate`'s), and inverse-CDF sampling draws from the same softmax.
They change the random stream, so a seeded run samples other (equally likely) responses than before.

Why it is cheaper: `torch.multinomial` draws one exponential random number per vocabulary id
and step; the inverse CDF needs one uniform number per row. A decoding step feeds one token per
row through every Linear layer, and MKL's kernel for `x @ W.T` with few rows of x runs slower than
the same product as `(W @ x.T).T`. The figures are in the benchmark's README
(detox_lightning/bench/README.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList


@contextlib.contextmanager
def merged_lora(peft_model: nn.Module) -> Iterator[int]:
    """Run the active LoRA adapter merged into its float32 base weights inside this block.

    Each targeted base weight W is replaced by a new tensor W + scaling * B @ A, and the very
    same W is put back on exit (no subtraction, so the frozen weights come back bit for bit,
    however often it is done). Inside, peft's layers skip their adapter branch. Costs one extra
    copy of the targeted weights while inside (FLAN-T5-base, q and v: ~170 MB).

    Nothing is merged (yields 0) when adapters are disabled (the reference as the bare base),
    for non-float32 base weights (bf16 rounding would differ from the unmerged forward that
    scores the update), or in training mode (the merged weights are not trained).

    Yields:
        how many layers were merged.
    """
    from peft.tuners.lora import LoraLayer

    active = getattr(peft_model, "active_adapter", None)
    layers = []
    if not peft_model.training and isinstance(active, str):
        for module in peft_model.modules():  # a layer's `disable_adapters` is set by peft's `disable_adapter()`
            if isinstance(module, LoraLayer) and active in module.lora_A and not module.merged and not module.disable_adapters:
                base = module.get_base_layer()
                if isinstance(base, nn.Linear) and base.weight.dtype == torch.float32:
                    layers.append((module, base))
    saved = []
    try:
        with torch.no_grad():
            for module, base in layers:
                original = base.weight.data
                merged = original + module.get_delta_weight(active).to(original.dtype)  # may raise: nothing changed yet
                base.weight.data = merged
                module.merged_adapters.append(active)
                saved.append((module, base, original))  # only what was merged is put back
        yield len(layers)
    finally:
        for module, base, original in saved:
            base.weight.data = original
            module.merged_adapters.remove(active)


FEW_ROWS = 128  # up to this many rows the transposed product is the faster one (bench README); beyond, F.linear


def _few_row_linear(layer: nn.Linear):
    """`layer.forward` computing y = (W @ x.T).T when x has at most `FEW_ROWS` rows, else `F.linear`."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > FEW_ROWS:
            return nn.functional.linear(x, layer.weight, layer.bias)
        y = (layer.weight @ x.reshape(rows, x.shape[-1]).T).T  # (rows, out): W (out, in) @ x.T (in, rows)
        y = y.reshape(*x.shape[:-1], layer.out_features)  # (..., out)
        return y if layer.bias is None else y + layer.bias

    return forward


@contextlib.contextmanager
def few_row_linears(model: nn.Module) -> Iterator[int]:
    """Inside this block, every float32 CPU `nn.Linear` of `model` multiplies few rows as (W @ x.T).T.

    The same product with another summation order (float32 rounding, as merged weights), for the
    decoding steps of `generate`, which feed one token per row (B rows) through every layer. A
    layer that already has its own `forward` (e.g. a hook of accelerate's) is left alone. On exit
    every layer is as before, even after an error.

    Yields:
        how many layers were switched.
    """
    layers = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in vars(m)
              and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    try:
        for layer in layers:
            layer.forward = _few_row_linear(layer)
        yield len(layers)
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)


class InverseCDFSampler(LogitsProcessor):
    """A `LogitsProcessor` that samples one token per row from softmax(scores / temperature).

    It leaves the drawn token at 0 and every other at -inf, so greedy decoding (`do_sample=False`)
    picks it. Put it last: the processors before it (e.g. `min_length`'s EOS mask) shape what it
    samples from, as they shape `torch.multinomial`'s. One uniform number per row (from torch's
    global generator, so `torch.manual_seed` repeats a run).
    """

    def __init__(self, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive")
        self.temperature = temperature

    def cdf(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, V) float64 cumulative probabilities of softmax(scores / temperature).

        Float64 on purpose: near the top of a float32 CDF one rounding step (~6e-8) is wider than
        the probabilities of thousands of tokens of a 32k-152k vocabulary, which would then never
        be drawn while their neighbours are drawn too often. Token i owns [cdf[i-1], cdf[i]).
        """
        probs = (scores.double() / self.temperature).softmax(dim=-1)  # (B, V); -inf gives exactly 0
        return probs.cumsum(dim=-1)

    @staticmethod
    def draw(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """(B, 1) token ids whose CDF interval holds u (B, 1) float64 in [0, 1)."""
        u = u * cdf[:, -1:]  # (B, 1): the CDF's own total, 1 up to rounding
        # right=True: a u that lands exactly on a boundary goes to the next token, never to one of probability 0
        token = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1)
        # u rounded up to the total would fall past the last token of non-zero probability: step back to it
        steps = torch.diff(cdf, dim=-1, prepend=torch.zeros_like(cdf[:, :1]))  # (B, V)
        last_possible = (steps > 0).cumsum(dim=-1).argmax(dim=-1, keepdim=True)
        return torch.minimum(token, last_possible)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = self.cdf(scores)  # (B, V) float64
        u = torch.rand(scores.shape[0], 1, device=scores.device, dtype=torch.float64)  # 53 random bits a row
        token = self.draw(cdf, u)  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def inverse_cdf_kwargs(generation_kwargs: dict) -> dict:
    """`generate` kwargs that sample with `InverseCDFSampler` instead of `torch.multinomial`.

    Only for the full distribution (top_k 0, top_p 1, as PPO's settings require): the sampler
    applies the temperature and nothing else.
    """
    kwargs = dict(generation_kwargs)
    top_k, top_p = kwargs.pop("top_k", 0), kwargs.pop("top_p", 1.0)
    if (top_k or 0) > 0 or (top_p is not None and top_p < 1.0):
        raise ValueError(f"inverse-CDF sampling draws from the full distribution; got top_k={top_k}, top_p={top_p}")
    temperature = kwargs.pop("temperature", 1.0) or 1.0
    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    processors.append(InverseCDFSampler(temperature))
    return kwargs | {"do_sample": False, "logits_processor": processors}
