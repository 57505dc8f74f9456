"""Catch reward hacking while it happens: a callback that watches every PPO iteration's rollouts.

From each iteration's sampled responses (`module.last_rollout`, every rank's), it computes
distinct-1/2, the repeated n-gram rate, the mean length, the fraction cut at the token cap, the EOS
rate and the KL, and every N iterations a judge's toxicity on the rollouts and its correlation with
the reward. It logs them as `monitor/...`, compares them with the first iteration's values against
bands, and on a breach warns, stops the run, or rolls back to the last state whose rollouts were
within bands. The failures it is for: filler and repetition ("a brown a brown", trl #242), and KL
growing until every query gets the same answer (trl #204).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from detox_lightning.errors import out_of_range, raise_problems
from detox_lightning.evaluation.scoring import run_scoring, toxicity_of
from detox_lightning.io.checkpoint import iterations_done

Action = Literal["warn", "stop", "rollback"]
Adjust = Literal["learning_rate", "kl_coef"]

# ---- pure figures of a batch of responses ----


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(responses: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of all responses (Li et al., 2016), in [0, 1].

    1 when no n-gram repeats anywhere in the batch; low when responses repeat themselves or each
    other. 0 when the batch has no n-gram at all (no diversity to speak of).
    """
    grams = [g for tokens in responses for g in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(responses: Sequence[Sequence[int]], n: int) -> float:
    """Fraction of n-grams that repeat an n-gram met earlier in the same response, in [0, 1].

    `sum(total_i - unique_i) / sum(total_i)` over responses i (Welleck et al.'s seq-rep-n, pooled):
    "sodium sodium sodium sodium" has 2-gram rate 2/3. 0 when the batch has no n-gram.
    """
    total = repeated = 0
    for tokens in responses:
        grams = ngrams(tokens, n)
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two samples; nan when either is constant or has fewer than 2 values."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


@dataclass
class RolloutStats:
    """Per-response figures of one iteration (lists of B, or of every rank's B once gathered).

    Attributes:
        tokens: each response's tokens before its EOS.
        lengths: response lengths in tokens, EOS included (as `tokens/responses_len_mean`).
        capped: the response reached the token cap (`max_new_tokens`).
        eos: the response ended with EOS.
        kl: KL to the reference summed over the response (as `objective/kl`); None when the
            estimator runs no reference (GRPO with beta 0).
        scores: raw reward-model scores.
        judge_toxicity: the judge's toxicity of each response, on the iterations that score it.
    """

    tokens: list[list[int]]
    lengths: list[int]
    capped: list[bool]
    eos: list[bool]
    kl: list[float] | None
    scores: list[float]
    judge_toxicity: list[float] | None = None

    @classmethod
    def of(cls, record) -> RolloutStats:
        """From a `rollout.RolloutRecord`."""
        lengths = record.mask.sum(dim=1)
        tokens, eos = [], []
        for ids, length in zip(record.response_ids.tolist(), lengths.tolist(), strict=True):
            body = ids[:length]
            ended = bool(body) and body[-1] in record.end_token_ids
            tokens.append(body[:-1] if ended else body)
            eos.append(ended)
        return cls(
            tokens=tokens,
            lengths=lengths.tolist(),
            capped=(lengths >= record.max_new_tokens).tolist(),
            eos=eos,
            kl=record.kl.float().tolist() if record.kl is not None else None,
            scores=record.scores.float().tolist(),
        )

    @classmethod
    def merge(cls, parts: Sequence[RolloutStats]) -> RolloutStats:
        """Every rank's stats as one, rank 0's rows first."""

        def rows(name: str) -> list | None:
            if any(getattr(p, name) is None for p in parts):
                return None
            return [row for p in parts for row in getattr(p, name)]

        return cls(*(rows(name) for name in ("tokens", "lengths", "capped", "eos", "kl", "scores", "judge_toxicity")))


def rollout_figures(stats: RolloutStats, repeat_n: int, length_clip: int | None = None) -> dict[str, float]:
    """The `monitor/...` figures of one iteration's rollouts.

    Args:
        stats: every rank's rollouts of the iteration.
        repeat_n: the n of the repeated n-gram rate.
        length_clip: `response_len_clipped` is the mean of min(length, length_clip): with the
            smallest token cap the run can draw, it does not move with each iteration's drawn cap
            (the first tokens of a response do not depend on the cap), so a band on it sees the
            policy change and not the draw. None: no clip.
    """
    figures = {
        "monitor/distinct_1": distinct_n(stats.tokens, 1),
        "monitor/distinct_2": distinct_n(stats.tokens, 2),
        "monitor/repeated_ngram_rate": repeated_ngram_rate(stats.tokens, repeat_n),
        "monitor/response_len_mean": float(np.mean(stats.lengths)),
        "monitor/response_len_clipped": float(np.mean(np.minimum(stats.lengths, length_clip or max(stats.lengths)))),
        "monitor/capped_frac": float(np.mean(stats.capped)),
        "monitor/eos_rate": float(np.mean(stats.eos)),
    }
    if stats.kl is not None:
        figures["monitor/kl"] = float(np.mean(stats.kl))
    if stats.judge_toxicity is not None:
        figures["monitor/judge_toxicity"] = float(np.mean(stats.judge_toxicity))
        # Expected negative (a higher reward means less toxic); drifting to 0 or above means the
        # reward pays for something the judge does not see as less toxic.
        figures["monitor/judge_reward_corr"] = pearson(stats.judge_toxicity, stats.scores)
    return figures


# ---- bands ----

LABELS = {
    "monitor/distinct_1": "distinct-1",
    "monitor/distinct_2": "distinct-2",
    "monitor/repeated_ngram_rate": "repeated n-gram rate",
    "monitor/response_len_mean": "response length",
    "monitor/response_len_clipped": "clipped length",
    "monitor/capped_frac": "capped fraction",
    "monitor/eos_rate": "EOS rate",
    "monitor/kl": "KL",
    "monitor/judge_toxicity": "judge toxicity",
    "monitor/judge_reward_corr": "judge/reward correlation",
}


@dataclass(frozen=True)
class Band:
    """One limit on a figure.

    kind: `drop` (relative fall from the first value above `limit`), `change` (relative move
    either way above `limit`), `ceiling` (value above `limit`), `rise` (absolute rise over the
    first value above `limit`).
    """

    metric: str
    kind: Literal["drop", "change", "ceiling", "rise"]
    limit: float

    def describe(self) -> str:
        if self.kind == "drop":
            return f"falls at most {self.limit:.0%} below the first iteration's"
        if self.kind == "change":
            return f"moves at most {self.limit:.0%} from the first iteration's"
        if self.kind == "ceiling":
            return f"at most {self.limit:g}"
        return f"rises at most {self.limit:g} above the first iteration's"


@dataclass(frozen=True)
class Breach:
    band: Band
    value: float
    first: float | None

    def line(self, iteration: int) -> str:
        label = LABELS.get(self.band.metric, self.band.metric)
        since = ""
        if self.first is not None and self.band.kind != "ceiling":
            change = (self.value - self.first) / self.first if self.band.kind in ("drop", "change") else None
            since = f" (first {self.first:.4g}" + (f", {change:+.0%})" if change is not None else ")")
        return (
            f"monitor: iteration {iteration}: {label} {self.value:.4g}{since} is outside its band: "
            f"{self.band.describe()}"
        )


def check_bands(first: dict[str, float], current: dict[str, float], bands: Sequence[Band]) -> list[Breach]:
    """The bands that `current` breaches, compared with `first` where the band is relative.

    A figure missing from `current` (e.g. the judge's on an iteration it does not score), a nan,
    or a relative band whose first value is missing or 0 is never a breach.
    """
    breaches = []
    for band in bands:
        value = current.get(band.metric)
        if value is None or math.isnan(value):
            continue
        base = first.get(band.metric)
        if band.kind == "ceiling":
            breached = value > band.limit
        elif base is None or math.isnan(base) or (band.kind != "rise" and base == 0):
            continue
        elif band.kind == "drop":
            breached = (base - value) / abs(base) > band.limit
        elif band.kind == "change":
            breached = abs(value - base) / abs(base) > band.limit
        else:
            breached = value - base > band.limit
        if breached:
            breaches.append(Breach(band, value, base))
    return breaches


# ---- the callback ----


class RolloutMonitor(Callback):
    """Watch each PPO iteration's rollouts for reward hacking; warn, stop or roll back on a breach.

    Figures (TensorBoard `monitor/...`, from every rank's rollouts): `distinct_1`, `distinct_2`
    (distinct token n-grams / all, over the batch), `repeated_ngram_rate` (n-grams repeating an
    earlier one of the same response), `response_len_mean` (tokens, EOS included),
    `response_len_clipped` (the same, each length clipped at `generation.output_min_length`, the
    smallest cap a PPO iteration can draw, so it does not move with the drawn cap), `capped_frac`
    (responses that reached the token cap), `eos_rate`, `kl` (summed per response, as
    `objective/kl`), and on judged iterations `judge_toxicity` and `judge_reward_corr` (Pearson,
    expected negative). Relative bands compare with the first iteration of the run (kept in
    checkpoints, so a resumed run compares with the same one). Set a band to null to switch it off.

    Args:
        action: on a breach, `warn` (print it and go on), `stop` (end the run after this
            iteration: `last.ckpt` and the final evaluation are still written) or `rollback`
            (restore the last state whose rollouts were within bands, i.e. trainable weights,
            optimizer, KL controller and score statistics, adjust as below and go on).
        max_distinct_1_drop: breach when distinct-1 falls by more than this fraction, in (0, 1].
        max_distinct_2_drop: breach when distinct-2 falls by more than this fraction, in (0, 1].
        max_length_change: breach when the clipped mean response length (`response_len_clipped`)
            moves by more than this fraction either way, in (0, 1].
        max_repeated_ngram_rate: breach when the repeated n-gram rate exceeds this, in (0, 1].
        max_kl: breach when the mean KL per response (`objective/kl`) exceeds this (> 0).
        max_judge_toxicity_rise: breach when the judge's mean toxicity on the rollouts rises by
            more than this over its first value, in (0, 1]. The reward-hacking alarm: the reward
            rises while a classifier that did not train the policy sees more toxicity. On by
            default; it acts only where the `ToxicityEvaluation` has a judge.
        repeat_n: the n of the repeated n-gram rate.
        judge_every_n_iterations: score the rollouts with the judge of the `ToxicityEvaluation`
            callback at iterations 1, 1 + N, 1 + 2N, ...; 0: never (also when no judge is set).
        rollback_adjust: what a rollback changes: `learning_rate` (multiplied by
            `rollback_factor`) or `kl_coef` (divided by it).
        rollback_factor: in (0, 1].
        max_rollbacks: after this many rollbacks in a run, the next breach stops the run.
    """

    def __init__(
        self,
        action: Action = "warn",
        max_distinct_1_drop: float | None = None,
        max_distinct_2_drop: float | None = 0.5,
        max_length_change: float | None = 0.4,
        max_repeated_ngram_rate: float | None = None,
        max_kl: float | None = None,
        max_judge_toxicity_rise: float | None = 0.1,
        repeat_n: int = 3,
        judge_every_n_iterations: int = 4,
        rollback_adjust: Adjust = "learning_rate",
        rollback_factor: float = 0.5,
        max_rollbacks: int = 3,
    ) -> None:
        ratios = {
            "max_distinct_1_drop": max_distinct_1_drop,
            "max_distinct_2_drop": max_distinct_2_drop,
            "max_length_change": max_length_change,
            "max_repeated_ngram_rate": max_repeated_ngram_rate,
            "max_judge_toxicity_rise": max_judge_toxicity_rise,
            "rollback_factor": rollback_factor,
        }
        problems = []
        for name, value in [*ratios.items(), ("max_kl", max_kl)]:
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"{name}={value!r} is not a number")
            elif name == "max_kl":
                problems.append(out_of_range(name, value, 0, low_open=True))
            else:
                problems.append(out_of_range(name, value, 0, 1, low_open=True))
        if action not in get_args(Action):
            problems.append(f"action={action!r} is not one of {', '.join(get_args(Action))}")
        if rollback_adjust not in get_args(Adjust):
            problems.append(f"rollback_adjust={rollback_adjust!r} is not one of {', '.join(get_args(Adjust))}")
        problems += [
            out_of_range("repeat_n", repeat_n, 1),
            out_of_range("judge_every_n_iterations", judge_every_n_iterations, 0),
            out_of_range("max_rollbacks", max_rollbacks, 0),
        ]
        raise_problems(sorted(p for p in problems if p), prefix="RolloutMonitor: ")
        self.action, self.repeat_n, self.judge_every_n_iterations = action, repeat_n, judge_every_n_iterations
        self.rollback_adjust, self.rollback_factor, self.max_rollbacks = rollback_adjust, rollback_factor, max_rollbacks
        specs = [
            ("monitor/distinct_1", "drop", max_distinct_1_drop),
            ("monitor/distinct_2", "drop", max_distinct_2_drop),
            ("monitor/response_len_clipped", "change", max_length_change),
            ("monitor/repeated_ngram_rate", "ceiling", max_repeated_ngram_rate),
            ("monitor/kl", "ceiling", max_kl),
            ("monitor/judge_toxicity", "rise", max_judge_toxicity_rise),
        ]
        self.bands = [Band(metric, kind, float(limit)) for metric, kind, limit in specs if limit is not None]
        self.first: dict[str, float] = {}  # the run's first value of each figure
        self.last: dict[str, float] = {}
        self.length_clip: int | None = None  # generation.output_min_length, read at each iteration
        self.last_at: dict[str, int] = {}  # the iteration of each figure in `last` (the judge's are not every one's)
        self.breaches: dict[str, int] = {}  # metric -> iterations in breach
        self.rollbacks = 0
        self.rolled_back: list[tuple[int, int]] = []  # (iteration of the breach, iteration restored) this run
        self._pending: dict | None = None  # the state before this iteration (its rollouts are judged at its end)
        self._in_band: dict | None = None  # the last state whose rollouts were within bands

    # ---- state kept in checkpoints (plain numbers: loads with weights_only=True) ----

    def state_dict(self) -> dict:
        return {"first": dict(self.first), "breaches": dict(self.breaches), "rollbacks": self.rollbacks}

    def load_state_dict(self, state_dict: dict) -> None:
        self.first = dict(state_dict.get("first", {}))
        self.breaches = dict(state_dict.get("breaches", {}))
        self.rollbacks = int(state_dict.get("rollbacks", 0))

    # ---- hooks ----

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.action == "rollback":
            self._pending = capture_state(pl_module, iterations_done(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = getattr(pl_module, "last_rollout", None)
        if record is None:
            return
        iteration = iterations_done(trainer)  # this one included
        stats = RolloutStats.of(record)
        scoring = run_scoring(trainer, with_judge=True)  # the ToxicityEvaluation's judge and text
        n = self.judge_every_n_iterations
        if scoring is not None and n and (iteration - 1) % n == 0:
            scoring.judge.to(pl_module.device)
            stats.judge_toxicity = toxicity_of(scoring.judge, record.queries, record.responses, scoring.text).tolist()
        if trainer.world_size > 1:  # every rank's rollouts: the same figures and decisions everywhere
            parts = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, stats)
            stats = RolloutStats.merge(parts)
        self.length_clip = getattr(getattr(pl_module, "generation", None), "output_min_length", None)
        figures = rollout_figures(stats, self.repeat_n, self.length_clip)
        for name, value in figures.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=len(stats.tokens))
        new = {k: v for k, v in figures.items() if k not in self.first}
        self.first.update(new)
        self.last.update(figures)
        self.last_at.update(dict.fromkeys(figures, iteration))
        if "monitor/distinct_2" in new:
            rank_zero_info(f"monitor: first rollouts (iteration {iteration}): {self.describe(figures)}")
        breaches = check_bands(self.first, figures, self.bands)
        for breach in breaches:
            self.breaches[breach.band.metric] = self.breaches.get(breach.band.metric, 0) + 1
            rank_zero_info(breach.line(iteration) + f"; action: {self.action}")
        if not breaches:
            self._in_band = self._pending
        elif self.action == "stop":
            self.stop(trainer, iteration, "action: stop")
        elif self.action == "rollback":
            self.rollback(trainer, pl_module, iteration)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.last:
            return
        breaches = ", ".join(f"{LABELS[m]} x{c}" for m, c in self.breaches.items()) or "none"
        iteration = iterations_done(trainer)
        rank_zero_info(
            f"monitor: last rollouts (iteration {iteration}): {self.describe(self.last, with_first=True, at=iteration)}; "
            f"iterations in breach: {breaches}" + (f"; rollbacks: {self.rollbacks}" if self.rollbacks else "")
        )

    # ---- helpers ----

    def describe(self, figures: dict[str, float], with_first: bool = False, at: int | None = None) -> str:
        parts = []
        for name, value in figures.items():
            label = {
                "monitor/repeated_ngram_rate": f"repeated {self.repeat_n}-grams",
                "monitor/response_len_clipped": f"length (clipped at {self.length_clip})",
            }.get(name, LABELS[name])
            first = self.first.get(name)
            was = f"{first:.3g} -> " if with_first and first is not None else ""
            when = f" (iteration {self.last_at[name]})" if at is not None and self.last_at.get(name, at) != at else ""
            parts.append(f"{label} {was}{value:.3g}{when}")
        return ", ".join(parts)

    def stop(self, trainer: pl.Trainer, iteration: int, why: str) -> None:
        trainer.should_stop = True
        rank_zero_info(
            f"monitor: stopping after iteration {iteration} ({why}); checkpoints and the final evaluation are still written"
        )

    def rollback(self, trainer: pl.Trainer, module: pl.LightningModule, iteration: int) -> None:
        if self.rollbacks >= self.max_rollbacks:
            return self.stop(trainer, iteration, f"{self.rollbacks} rollbacks already, max_rollbacks={self.max_rollbacks}")
        if self._in_band is None:
            return self.stop(trainer, iteration, "no state within bands to roll back to since this run started")
        optimizer = module.optimizers().optimizer
        lrs = [group["lr"] for group in optimizer.param_groups]
        kl_coef = module.kl_ctl.value
        restore_state(module, self._in_band)
        if self.rollback_adjust == "learning_rate":
            for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr * self.rollback_factor
            change = f"learning rate {lrs[0]:.3g} -> {lrs[0] * self.rollback_factor:.3g}"
        else:
            module.kl_ctl.value = kl_coef / self.rollback_factor
            change = f"KL coefficient {kl_coef:.3g} -> {module.kl_ctl.value:.3g}"
        self.rollbacks += 1
        self._pending = None
        after = self._in_band["after_iteration"]
        self.rolled_back.append((iteration, after))
        rank_zero_info(
            f"monitor: rolled back to the state after iteration {after} (its rollouts, iteration {after + 1}'s, "
            f"were within bands); {change}; rollback {self.rollbacks} of at most {self.max_rollbacks}"
        )


def capture_state(module: pl.LightningModule, after_iteration: int) -> dict:
    """What a checkpoint restores of a PPO module, in memory: weights, optimizer, score
    statistics (`module.snapshot()`, as the non-finite guard keeps) and the KL controller."""
    return {"after_iteration": after_iteration, "snapshot": module.snapshot(), "kl_controller": module.kl_ctl.state_dict()}


def restore_state(module: pl.LightningModule, state: dict) -> None:
    module.restore(state["snapshot"])
    module.kl_ctl.load_state_dict(state["kl_controller"])
