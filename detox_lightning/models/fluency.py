"""Fluency: how likely a frozen evaluator model finds each response, given its prompt.

The detoxification literature reports the perplexity of the generated continuations under a
larger frozen LM (DExperts: GPT-2 XL). By default the evaluator is the run's frozen reference (the
starting policy), scored on the very tokens sampled, so a policy that lowers toxicity by writing
text its own starting point finds unlikely shows it. `EvaluatorLM` is the literature's choice: any
causal LM, scoring the decoded text retokenised with its own tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from detox_lightning.errors import ConfigError, user_input
from detox_lightning.models.architectures import Architecture
from detox_lightning.models.rollout import logprobs_and_values


@torch.no_grad()
def response_log_perplexity(
    model,
    arch: Architecture,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_ids: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """(B,) mean negative log-likelihood of each response's tokens, NaN for an empty response.

    Teacher-forced at temperature 1 (the evaluator's own distribution, whatever the sampling
    temperature was), prompt tokens excluded: only the response is judged, conditioned on its prompt.

    Args:
        model: the evaluator (e.g. the policy inside `reference_mode`), in eval mode.
        input_ids, attention_mask: (B, P) prompts, padded on the architecture's side.
        response_ids: (B, T) responses; mask: (B, T) 1 on response tokens, EOS included.
    """
    _, logprobs, _ = logprobs_and_values(model, arch, input_ids, attention_mask, response_ids, mask, 1.0)  # (B, T)
    m = mask.to(logprobs.dtype)  # (B, T)
    return -(logprobs * m).sum(dim=1) / m.sum(dim=1)  # (B,): 0 / 0 is NaN for an empty response


class EvaluatorLM:
    """A frozen causal LM that scores text: the literature's fluency evaluator.

    Args:
        name_or_path: a hub id, a local directory or a `builtin:` name of a causal LM.
        dtype: `float32` (default) or `bfloat16`.
        batch_size: texts per forward pass.
    """

    def __init__(self, name_or_path: str, dtype: str = "float32", batch_size: int = 16) -> None:
        from transformers import AutoTokenizer

        from detox_lightning.models.architectures import CAUSAL
        from detox_lightning.models.dtypes import DTYPES
        from detox_lightning.offline.builtin import resolve

        if dtype not in DTYPES:
            raise ConfigError(f"evaluator_dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        what = f"evaluator_model_name_or_path={name_or_path!r} could not be loaded (expected a causal LM: a hub id, a local directory or a builtin: name)"
        with user_input(what):
            path = resolve(name_or_path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = CAUSAL.auto_model_class().from_pretrained(path, dtype=DTYPES[dtype]).eval()
        self.model.requires_grad_(False)
        self.name_or_path, self.batch_size = name_or_path, batch_size

    def to(self, device: torch.device) -> EvaluatorLM:
        self.model.to(device)
        return self

    @torch.no_grad()
    def log_perplexity(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """(B,) float64 mean negative log-likelihood of each response's tokens given its prompt, NaN
        for an empty response: the prompt tokenised as the model's input (BOS where its tokenizer
        adds one), the response after it without special tokens. (Without BOS, an empty prompt
        leaves the response's first token unscored: nothing predicts it.)"""
        tok = self.tokenizer
        out = torch.full((len(prompts),), float("nan"), dtype=torch.float64)
        rows = [(tok(p).input_ids, tok(r, add_special_tokens=False).input_ids) for p, r in zip(prompts, responses, strict=True)]
        order = sorted(range(len(rows)), key=lambda i: -sum(map(len, rows[i])))  # similar lengths together: less padding
        device = self.model.device
        for start in range(0, len(order), self.batch_size):
            chunk = [i for i in order[start : start + self.batch_size] if rows[i][1]]  # empty responses stay NaN
            if not chunk:
                continue
            width = max(len(rows[i][0]) + len(rows[i][1]) for i in chunk)  # L
            ids = torch.zeros(len(chunk), width, dtype=torch.long)  # (b, L) right-padded: positions from 0 in every row
            attention = torch.zeros(len(chunk), width, dtype=torch.long)  # (b, L)
            target = torch.zeros(len(chunk), width, dtype=torch.bool)  # (b, L) True on response tokens
            for j, i in enumerate(chunk):
                prompt, response = rows[i]
                n = len(prompt) + len(response)
                ids[j, :n] = torch.tensor(prompt + response)
                attention[j, :n] = 1
                target[j, len(prompt) : n] = True
            logits = self.model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()  # (b, L, V)
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # (b, L-1, V): token t+1 given tokens <= t
            picked = logprobs.gather(-1, ids[:, 1:, None].to(device)).squeeze(-1).double().cpu()  # (b, L-1)
            mask = target[:, 1:]  # (b, L-1): the first response token is predicted from the prompt's last
            out[chunk] = -(picked * mask).sum(dim=1) / mask.sum(dim=1)  # (b,)
        return out
