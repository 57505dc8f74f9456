"""Model-facing steps of an RL iteration: sample responses, and log-probs/values of given responses.

Architecture-agnostic: how prompts are padded, where the response starts and how the
teacher-forced pass is fed come from the policy's `Architecture` (architectures.py), so that
`logits[:, t]`, `logprobs[:, t]` and `values[:, t]` belong to response token t for T5 and Llama alike.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from detox_lightning.models.architectures import Architecture, PaddingSide, decoder_inputs  # noqa: F401 - re-exported
from detox_lightning.rl.experience import Experience  # noqa: F401 - re-exported: the batch the update reads
from detox_lightning.rl.kl import full_kl
from detox_lightning.rl.masks import response_mask
from detox_lightning.trl_compat import entropy_from_logits, selective_log_softmax


@dataclass
class Samples:
    """Sampled responses with what generation already computed for them.

    Attributes:
        response_ids: (B, T) tokens, padded after the first EOS.
        mask: (B, T) bool response mask.
        step_logits: T tensors (B, V), the raw logits of each sampling step (empty unless kept).
        values: (B, T) value-head predictions from the decoder's last hidden states (None unless kept).
        sampler_logprobs: (B, T) a separate sampler's (vLLM's) log-probs of the sampled tokens,
            zero past each response's end; None when the trainer's own `generate` sampled.
    """

    response_ids: torch.Tensor
    mask: torch.Tensor
    step_logits: tuple[torch.Tensor, ...] = ()
    values: torch.Tensor | None = None
    sampler_logprobs: torch.Tensor | None = None

    def logits(self, rows: torch.Tensor, length: int) -> torch.Tensor:
        """Raw logits (len(rows), length, V) float32 of `rows`' first `length` response tokens."""
        return torch.stack([step[rows] for step in self.step_logits[:length]], dim=1).float()


@dataclass
class RolloutRecord:
    """What one iteration sampled on this rank, kept on the CPU for callbacks (e.g. a monitor).

    Attributes:
        queries, responses: the prompts and decoded responses (B,).
        response_ids: (B, T) response tokens; mask: (B, T) bool, True up to and including EOS.
        max_new_tokens: this iteration's token cap.
        end_token_ids: every id that ends a response (EOS, and a chat model's end of turn).
        scores: (B,) raw reward-model scores; kl: (B,) KL to the reference summed over each response
            (None when no reference pass ran).
    """

    queries: list[str]
    responses: list[str]
    response_ids: torch.Tensor
    mask: torch.Tensor
    max_new_tokens: int
    end_token_ids: list[int]
    scores: torch.Tensor
    kl: torch.Tensor | None


@torch.no_grad()
def sample(
    model,
    arch: Architecture,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    generation_kwargs: dict,
    keep_logits: bool = False,
) -> Samples:
    """One batched `generate` call; with `keep_logits`, also its raw logits and values.

    B rows in, B responses out: with k samples per prompt the caller repeats each prompt k times
    (k consecutive rows), so B = prompts x k.

    Taking log-probs and values from generation saves a forward pass: they are computed with the
    same weights (checked against `logprobs_and_values` in the tests). The price is memory: the
    (B, T, V) step logits live until the rollout is scored.

    Args:
        model: the value-head policy; `generation_kwargs` must name `eos_token_id` and `pad_token_id`.
    """
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        return_dict_in_generate=True,
        output_logits=keep_logits,
        output_hidden_states=keep_logits and model.v_head is not None,
        **generation_kwargs,
    )
    response_ids = arch.responses(out.sequences, input_ids.shape[1])  # (B, T): the generated tokens only
    mask = response_mask(response_ids, generation_kwargs["eos_token_id"])  # (B, T) bool: up to the first EOS
    response_ids = response_ids.masked_fill(~mask, generation_kwargs["pad_token_id"])  # (B, T)
    samples = Samples(response_ids, mask)
    if keep_logits:
        samples.step_logits = out.logits  # T tensors (B, V)
        if model.v_head is not None:
            samples.values = model.v_head(arch.generated_hidden(out)).squeeze(-1).float()  # (B, T)
    return samples


def token_logprobs(logits: torch.Tensor, response_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs (B, T) of the response tokens under `softmax(logits / temperature)`, in float32."""
    return selective_log_softmax(_scaled(logits, temperature), response_ids)  # (B, T)


def logprobs_and_values(
    model,
    arch: Architecture,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One teacher-forced forward pass over prompt and response (`Architecture.forward`).

    Returns:
        logits (B, T, V) float32 (not divided by the temperature), logprobs (B, T) and values (B, T)
        (None without a value head).
    """
    logits, values = arch.forward(model, input_ids, attention_mask, response_ids, response_mask)  # (B, T, V), (B, T)
    return logits, token_logprobs(logits, response_ids, temperature), None if values is None else values.float()


@dataclass
class RolloutScores:
    """Per-token figures of a rollout, each (B, T) float32, zero past each response's end.

    Attributes:
        logprobs: log-probs of the response tokens under the policy.
        ref_logprobs: the same under the frozen reference (None when not asked for).
        values: value-head predictions (None without a value head).
        entropy: entropy of the policy's next-token distribution.
        full_kl: KL(policy || reference) over the whole vocabulary (None unless asked for).
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    full_kl: torch.Tensor | None = None


@torch.no_grad()
def score_rollout(
    model,
    arch: Architecture,
    samples: Samples,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    chunks: int | Sequence[torch.Tensor],
    reference_mode: Callable[[], AbstractContextManager],
    with_full_kl: bool = False,
    with_reference: bool = True,
) -> RolloutScores:
    """Policy and reference figures of `samples`, one chunk of rows at a time.

    `chunks` is either the row groups to use (together every row once) or a chunk size; with a
    size, rows are taken in order of length so that each chunk holds rows of similar length. Each
    chunk is trimmed to its own longest prompt and response, as `Experience.select` trims a
    micro-batch, so a chunk equal to an update micro-batch gives that micro-batch's first forward
    bit for bit (the training module relies on it: ratio 1 at the first step in bfloat16 too,
    where kernels round differently for other shapes). Only one chunk's (b, t, V) policy and
    reference logits are alive at once (the whole batch's would be B / b times larger). The
    policy's figures come from generation when `samples` kept its logits, else from a forward
    pass. `reference_mode()` is the context that runs the frozen reference (see
    `policy.reference_mode`); without `with_reference` the reference pass is skipped (when no KL
    enters training: the estimator's `needs_reference`).
    """
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    if isinstance(chunks, int):
        chunks = (attention_mask.sum(dim=1) + samples.mask.sum(dim=1)).argsort(stable=True).split(chunks)  # (b,) each
    # With the policy's figures from generation no policy forward runs here, so the reference is
    # switched on once for every chunk: a switch walks every module of the model.
    reference_throughout = with_reference and bool(samples.step_logits)
    with reference_mode() if reference_throughout else contextlib.nullcontext():
        _score_chunks(model, arch, samples, input_ids, attention_mask, temperature, chunks, parts,
                      contextlib.nullcontext if reference_throughout else reference_mode, with_full_kl, with_reference)
    unsort = torch.cat(list(chunks)).argsort()  # (B,): chunk order back to row order
    return RolloutScores(**{name: torch.cat(pieces)[unsort] for name, pieces in parts.items()})  # (B, T) each


def _score_chunks(model, arch, samples, input_ids, attention_mask, temperature, chunks, parts, reference_mode,
                  with_full_kl, with_reference) -> None:
    """`score_rollout`'s loop: each chunk's (b, T) figures appended to `parts`."""
    length = samples.response_ids.shape[1]  # T
    for rows in chunks:  # (b,) row indices
        width = int(attention_mask[rows].sum(dim=1).max())  # p: the chunk's longest prompt
        t = int(samples.mask[rows].sum(dim=1).max())  # t: the chunk's longest response
        prompt = arch.trim_prompt(input_ids[rows], attention_mask[rows], width)  # (b, p) ids and mask
        ids, mask = samples.response_ids[rows, :t], samples.mask[rows, :t]  # (b, t) each
        if samples.step_logits:
            logits = samples.logits(rows, t)  # (b, t, V)
            values = samples.values[rows, :t] if samples.values is not None else None  # (b, t)
        else:
            logits, values = arch.forward(model, *prompt, ids, mask)  # (b, t, V), (b, t) or None
        logits = _scaled(logits, temperature)  # (b, t, V) float32
        chunk = {"logprobs": selective_log_softmax(logits, ids), "entropy": entropy_from_logits(logits)}  # (b, t) each
        if values is not None:
            chunk["values"] = values.float()  # (b, t)
        if with_reference:
            with reference_mode():
                ref_logits, _ = arch.forward(model, *prompt, ids, mask)  # (b, t, V)
            ref_logits = _scaled(ref_logits, temperature)  # (b, t, V) float32
            chunk["ref_logprobs"] = selective_log_softmax(ref_logits, ids)  # (b, t)
            if with_full_kl:
                chunk["full_kl"] = full_kl(logits, ref_logits)  # (b, t)
            del ref_logits
        del logits
        for name, value in chunk.items():
            parts[name].append(F.pad(value * mask, (0, length - t)))  # (b, T): back to the batch's length


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature  # dividing by 1 would still copy (b, t, V)
