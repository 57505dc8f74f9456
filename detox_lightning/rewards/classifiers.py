"""Reward components: a text in, a score out (higher = less toxic), plus the toxicity probability.

Chosen in YAML by `class_path` (`model.reward`). The same component gives the reward used by PPO
and the toxicity probability used by evaluation.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from functools import partial
from typing import Literal, get_args

import torch
from torch import nn

from detox_lightning.errors import ConfigError, out_of_range, raise_problems, user_input
from detox_lightning.offline.builtin import resolve
from detox_lightning.rewards.measurement import Toxicity
from detox_lightning.rewards.quantize import (
    INT8_DYNAMIC,
    QUANTIZE_CHOICES,
    Quantize,
    has_int8_linear,
    quantize_linear_int8,
)

RewardText = Literal["query_response", "response"]


def reward_texts(queries: list[str], responses: list[str], text: RewardText) -> list[str]:
    """The texts a classifier scores, for the reward and for the evaluation alike.

    `query + response` with nothing between them: the DialogSum prompt ends with "Summary:\n",
    and a causal model's prompt is continued directly, so the pair reads as the model wrote it.

    Args:
        queries: the prompts as decoded text, one per response.
        responses: the generated responses as decoded text.
        text: `query_response` (`query + response`) or `response` (the response alone).
    """
    check_reward_text(text)
    if text == "response":
        return list(responses)
    return [q + r for q, r in zip(queries, responses, strict=True)]


def check_reward_text(text: str, owner: str = "reward") -> None:
    """Raise a ConfigError naming `owner` unless `text` is one of `RewardText`'s values."""
    if text not in get_args(RewardText):
        raise ConfigError(f"{owner} text={text!r} is not known; expected one of {list(get_args(RewardText))}")


class RewardModel(nn.Module, ABC):
    """Base class: scores `query + response` (as the notebook) or the response alone.

    Args:
        text: what the reward sees, built by `reward_texts`: `query_response` (the notebook's
            `query + response`, nothing between them) or `response` only (the summary, without the
            dialogue that otherwise dominates the score).
    """

    def __init__(self, text: RewardText = "query_response") -> None:
        super().__init__()
        check_reward_text(text)
        self.text = text

    def train(self, mode: bool = True) -> RewardModel:
        # A judge is never trained: Lightning's model.train() must not switch its dropout on.
        return super().train(False)

    def forward(self, queries: list[str], responses: list[str]) -> torch.Tensor:
        """Rewards (N,) float32 for each (query, response) pair, scored on `reward_texts`."""
        return self.score(reward_texts(queries, responses, self.text))

    def pair_toxicity(self, queries: list[str], responses: list[str], text: RewardText) -> torch.Tensor:
        """Probability (N,) that each (query, response) pair is toxic, judged on `reward_texts`.

        What evaluation, the judge and monitors call: `evaluate`'s measurement over this
        component's `toxicity`. Components that score pairs rather than texts override it.
        """
        texts = reward_texts(queries, responses, text)
        if not texts:
            return torch.zeros(0)
        values = Toxicity(self.toxicity, keep_in_memory=True).compute(predictions=texts)["toxicity"]
        return torch.tensor(values, dtype=torch.float32)

    @abstractmethod
    def score(self, texts: list[str]) -> torch.Tensor:
        """Reward (N,) float32 for each text; higher means less toxic."""

    @abstractmethod
    def toxicity(self, texts: list[str]) -> torch.Tensor:
        """Probability (N,) float32 that each text is toxic."""


class HFClassifierReward(RewardModel):
    """A Hugging Face sequence classifier; reward = raw logit of the label named `reward_label`.

    Labels are looked up by name in the classifier's `id2label`, never by index, so a classifier
    whose labels come in another order gives the same reward.

    Args:
        model_name_or_path: hub id, local path or `builtin:` name of the classifier.
        reward_label: label whose raw logit is the reward.
        toxic_label: label whose softmax probability is the toxicity.
        text: see `RewardModel`.
        batch_size: texts per classifier forward, shortest first (on CPU 8 was faster than 16 with
            RoBERTa-base, and needs half the activations; README "Performance").
        max_length: longer texts keep their last `max_length` tokens: they are cut from the
            left, so in `query + response` the dialogue loses its start and the response, which
            the reward and the evaluation judge, is never cut while any of the query is left.
        trust_remote_code: allow code shipped with the model (off unless you trust the source).
        quantize: `int8`: on CPU, the Linear layers of the classifier's body run in int8 with
            dynamically quantized inputs (`detox_lightning.rewards.quantize`), from the first scoring on;
            the classification head stays float32. About 2-3x faster on CPU; an approximation of
            the reward, so opt-in: on a random-weight RoBERTa-base, whose scores of different
            texts all lie within ~0.07, it moved each by up to 0.024, for a rank correlation with
            float32 of 0.68-0.84 (two draws of weights and texts); on the builtin classifier's 800
            sample texts, 0.99999 with no toxicity verdict flipped. On a CUDA device it is ignored
            with a warning (scored as loaded). `none`: as loaded. `precision` says which one scores.
    """

    def __init__(
        self,
        model_name_or_path: str = "facebook/roberta-hate-speech-dynabench-r4-target",
        reward_label: str = "nothate",
        toxic_label: str = "hate",
        text: RewardText = "query_response",
        batch_size: int = 8,
        max_length: int = 512,
        trust_remote_code: bool = False,
        quantize: Quantize = "none",
    ) -> None:
        super().__init__(text)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        raise_problems([
            out_of_range("reward.batch_size", batch_size, 1),
            out_of_range("reward.max_length", max_length, 8),
            None if quantize in QUANTIZE_CHOICES else f"reward quantize={quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}",
        ])
        path = resolve(model_name_or_path)
        with user_input(
            f"reward model_name_or_path={model_name_or_path!r} could not be loaded as a sequence classifier with "
            f"its tokenizer (expected a hub id, a local model directory or a builtin: name)"
        ):
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.classifier = AutoModelForSequenceClassification.from_pretrained(
                path, trust_remote_code=trust_remote_code
            )
        # The response comes last: cut from the right, a long dialogue would push it out of the window.
        self.tokenizer.truncation_side = "left"
        self.classifier.requires_grad_(False)
        self.classifier.eval()
        labels = {name: int(i) for i, name in self.classifier.config.id2label.items()}
        for flag, name in (("reward_label", reward_label), ("toxic_label", toxic_label)):
            if name not in labels:
                raise ConfigError(
                    f"{flag}={name!r} is not a label of {model_name_or_path}; its labels are {sorted(labels)}"
                )
        self.reward_index = labels[reward_label]
        self.toxic_index = labels[toxic_label]
        self.batch_size = batch_size
        self.max_length = max_length
        self.quantize = quantize
        self._warned_cuda = False

    @property
    def precision(self) -> str:
        """What scores on the classifier's present device: `int8-dynamic`, or its dtype (`float32`)."""
        if has_int8_linear(self.classifier) or (self.quantize == "int8" and self._device().type == "cpu"):
            return INT8_DYNAMIC
        return str(self.classifier.dtype).removeprefix("torch.")

    def _device(self) -> torch.device:
        return self.classifier.get_input_embeddings().weight.device

    def _prepare(self, device: torch.device) -> None:
        """Quantize the body at the first scoring on CPU; on another device, warn once and score as loaded."""
        if self.quantize != "int8":
            return
        quantized = has_int8_linear(self.classifier)
        if device.type == "cpu" and not quantized:
            quantize_linear_int8(self.classifier.base_model)
        elif device.type != "cpu" and quantized:
            raise RuntimeError(
                f"reward quantize='int8' was applied on CPU and its int8 layers cannot move to {device}; "
                f"build the reward again on {device} (there it scores as loaded)"
            )
        elif device.type != "cpu" and not self._warned_cuda:
            warnings.warn(
                f"reward quantize='int8' runs on CPU only; on {device} the classifier scores in "
                f"{self.precision}", stacklevel=3,
            )
            self._warned_cuda = True

    @torch.no_grad()
    def logits(self, texts: list[str]) -> torch.Tensor:
        """Raw classifier logits (N, num_labels) in float32, in the order of `texts`.

        Texts go through the classifier `batch_size` at a time, shortest first, so each forward
        pads only to its own longest text.
        """
        device = self._device()
        self._prepare(device)
        out = torch.zeros(len(texts), self.classifier.config.num_labels, device=device)
        if not texts:
            return out
        encode = partial(self.tokenizer, truncation=True, max_length=self.max_length)
        # Tokenized twice (lengths, then per chunk): cheap next to the classifier, and the fast
        # tokenizer's own padding avoids `tokenizer.pad`'s slow path.
        lengths = [len(ids) for ids in encode(texts)["input_ids"]]
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            enc = encode([texts[i] for i in rows], padding=True, return_tensors="pt").to(device)
            out[torch.tensor(rows, device=device)] = self.classifier(**enc).logits.float()
        return out

    def score(self, texts: list[str]) -> torch.Tensor:
        return self.logits(texts)[:, self.reward_index]

    def toxicity(self, texts: list[str]) -> torch.Tensor:
        return self.logits(texts).softmax(dim=-1)[:, self.toxic_index]


class ProfanityCheckReward(RewardModel):
    """`alt-profanity-check` (a linear classifier shipped on PyPI) as a reward; works offline.

    reward = log-odds of "not profane" = log(1 - p) - log(p), with p clipped to [eps, 1 - eps],
    the analogue of the hate classifier's `nothate` logit for a model that only gives p.

    Args:
        text: see `RewardModel`.
        eps: probability clip, bounding the reward to about +-log(1/eps).
    """

    def __init__(self, text: RewardText = "query_response", eps: float = 1e-4) -> None:
        super().__init__(text)
        if not 0.0 < eps < 0.5:
            raise ConfigError(f"eps={eps} must lie in (0, 0.5)")
        from profanity_check import predict_prob

        self._predict_prob = predict_prob
        self.eps = eps

    def toxicity(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0)
        return torch.as_tensor(self._predict_prob(list(texts)), dtype=torch.float32)

    def score(self, texts: list[str]) -> torch.Tensor:
        p = self.toxicity(texts).double().clamp(self.eps, 1.0 - self.eps)
        return (torch.log1p(-p) - torch.log(p)).float()
