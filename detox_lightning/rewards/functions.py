"""Rewards as plain Python functions, and weighted sums of reward components.

`FunctionReward` calls `function(queries, responses)` (lists of strings) and takes the floats it
returns as rewards, as trl's reward functions do; `CombinedReward` adds reward components with
weights, e.g. the classifier's `nothate` logit plus a repetition penalty. Both load from YAML with
`class_path` and serve as the reward or as the evaluation's judge.

```yaml
reward:
  class_path: detox_lightning.CombinedReward
  init_args:
    components:
      - class_path: detox_lightning.HFClassifierReward
      - class_path: detox_lightning.FunctionReward
        init_args: {function: detox_lightning.rewards.functions:repeated_bigram_penalty}
    weights: [1.0, 2.0]
```
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable

import torch
from torch import nn

from detox_lightning.errors import ConfigError, one_line
from detox_lightning.moved import new_home
from detox_lightning.rewards.classifiers import RewardModel, RewardText, check_reward_text

PairFunction = Callable[[list[str], list[str]], list[float]]


def import_function(path: str, flag: str) -> PairFunction:
    """The callable named `package.module:name` (or `package.module.name`); a ConfigError otherwise."""
    module_name, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not name:
        raise ConfigError(f"{flag}={path!r} is not of the form 'package.module:name'")
    if (moved := new_home(path)) is not None:
        raise ConfigError(f"{flag}={path!r} names a module that has moved; use {moved!r}")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{flag}={path!r} does not import ({type(err).__name__}: {one_line(err)})") from err
    if not callable(function):
        raise ConfigError(f"{flag}={path!r} is a {type(function).__name__}, not a function")
    return function


def call_checked(function: PairFunction, path: str, queries: list[str], responses: list[str]) -> torch.Tensor:
    """`function(queries, responses)` as (N,) float32, refusing a wrong count or non-numbers."""
    values = function(list(queries), list(responses))
    try:
        out = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"reward function {path!r} returned {type(values).__name__}, not a list of numbers") from err
    if out.shape != (len(responses),):
        raise ConfigError(f"reward function {path!r} returned {out.numel()} scores for {len(responses)} responses")
    return out


class FunctionReward(RewardModel):
    """A Python function as the reward: `function(queries, responses) -> list[float]`, higher = better.

    Args:
        function: `package.module:name` of the reward function, called with the list of queries
            (prompt texts) and the list of decoded responses; returns one float per response.
        toxicity_function: `package.module:name` of a function of the same arguments returning the
            probability that each pair is toxic; needed where this component measures toxicity
            (as the evaluation's judge, or as the reward when an evaluation runs). None: none.
        text: how `score(texts)` reads lone texts: each text is passed as a response with an
            empty query (see `RewardModel`).
    """

    def __init__(self, function: str, toxicity_function: str | None = None, text: RewardText = "query_response"):
        super().__init__(text)
        self.function_path, self.toxicity_path = function, toxicity_function
        self.function = import_function(function, "FunctionReward function")
        self.toxicity_function = (
            import_function(toxicity_function, "FunctionReward toxicity_function") if toxicity_function else None
        )
        # One probe pair now: a function that returns the wrong shape fails here, before a run starts.
        probe = (["#Person1#: Hello.\nSummary:\n"], ["#Person1# greets."])
        call_checked(self.function, function, *probe)
        if self.toxicity_function is not None:
            call_checked(self.toxicity_function, toxicity_function, *probe)

    def forward(self, queries: list[str], responses: list[str]) -> torch.Tensor:
        return call_checked(self.function, self.function_path, queries, responses)

    def pair_toxicity(self, queries: list[str], responses: list[str], text: RewardText) -> torch.Tensor:
        check_reward_text(text)
        if self.toxicity_function is None:
            raise ConfigError(
                f"FunctionReward(function={self.function_path!r}) has no toxicity_function, so it cannot measure "
                f"toxicity (as a judge or in evaluation); set toxicity_function, or combine it with a classifier "
                f"(CombinedReward, toxicity_from)"
            )
        if text == "response":
            queries = [""] * len(responses)
        return call_checked(self.toxicity_function, self.toxicity_path, queries, responses)

    def score(self, texts: list[str]) -> torch.Tensor:
        return self([""] * len(texts), texts)

    def toxicity(self, texts: list[str]) -> torch.Tensor:
        return self.pair_toxicity([""] * len(texts), texts, "query_response")


class CombinedReward(RewardModel):
    """A weighted sum of reward components; its toxicity is one component's.

    Args:
        components: reward components (`class_path` each), e.g. `HFClassifierReward` and a
            `FunctionReward` penalty.
        weights: one weight per component (default: all 1).
        toxicity_from: index of the component whose toxicity this one reports (evaluation, judge).
    """

    def __init__(
        self, components: list[RewardModel], weights: list[float] | None = None, toxicity_from: int = 0
    ) -> None:
        super().__init__()
        weights = [1.0] * len(components) if weights is None else list(weights)
        if not components:
            raise ConfigError("CombinedReward components is empty; give at least one reward component")
        if len(weights) != len(components):
            raise ConfigError(f"CombinedReward weights has {len(weights)} values for {len(components)} components")
        if not 0 <= toxicity_from < len(components):
            raise ConfigError(f"CombinedReward toxicity_from={toxicity_from} must lie in [0, {len(components) - 1}]")
        self.components = nn.ModuleList(components)
        self.weights, self.toxicity_from = weights, toxicity_from

    def forward(self, queries: list[str], responses: list[str]) -> torch.Tensor:
        return sum(w * c(queries, responses).float().cpu() for w, c in zip(self.weights, self.components, strict=True))

    def pair_toxicity(self, queries: list[str], responses: list[str], text: RewardText) -> torch.Tensor:
        return self.components[self.toxicity_from].pair_toxicity(queries, responses, text)

    def score(self, texts: list[str]) -> torch.Tensor:
        return sum(w * c.score(texts).float().cpu() for w, c in zip(self.weights, self.components, strict=True))

    def toxicity(self, texts: list[str]) -> torch.Tensor:
        return self.components[self.toxicity_from].toxicity(texts)


# ---- ready-made penalties (0 for a clean response, negative otherwise) ----


def repeated_bigram_penalty(queries: list[str], responses: list[str]) -> list[float]:
    """Minus the fraction of a response's word bigrams that repeat an earlier one ("a brown a brown")."""
    out = []
    for response in responses:
        words = response.split()
        bigrams = list(itertools.pairwise(words))
        out.append(-(len(bigrams) - len(set(bigrams))) / len(bigrams) if bigrams else 0.0)
    return out


def short_response_penalty(queries: list[str], responses: list[str], min_words: int = 10) -> list[float]:
    """Minus the fraction of `min_words` a response falls short by (stopping early to dodge the reward)."""
    return [-max(0, min_words - len(r.split())) / min_words for r in responses]
