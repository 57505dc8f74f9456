"""Toxicity before/after with a paired bootstrap CI, a ROUGE guard, the notebook's table, a JSON
report and the exported adapter, as one Lightning callback.

The same held-out prompts are generated with the same seed before training (the frozen reference),
every N PPO iterations and at the end (the policy), so each prompt gives a before/after pair.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_args

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from detox_lightning.errors import ConfigError
from detox_lightning.evaluation import pictures, protocol
from detox_lightning.evaluation.best_adapter import Candidate, select_best
from detox_lightning.evaluation.metrics import Rouge, improvement_pct, paired_bootstrap_ci, summarize
from detox_lightning.evaluation.scoring import Scoring, toxicity_of
from detox_lightning.io.atomic import atomic_file, write_text
from detox_lightning.io.checkpoint import iterations_done
from detox_lightning.models.fluency import EvaluatorLM, response_log_perplexity
from detox_lightning.models.policy import reference_mode, save_adapter
from detox_lightning.rewards.classifiers import RewardModel, RewardText
from detox_lightning.rewards.quantize import describe_precision

TABLE_COLUMNS = ["query", "response_before", "response_after", "reward_before", "reward_after", "reward_diff"]


@dataclass
class Outputs:
    """One evaluation's per-sample figures; arrays are (prompts, samples_per_prompt)."""

    queries: list[str]
    responses: list[list[str]]
    toxicity: np.ndarray
    reward: np.ndarray
    length: np.ndarray
    judge_toxicity: np.ndarray | None
    rouge: dict[str, np.ndarray] | None
    log_ppl: np.ndarray | None = None
    more_judges: dict[str, np.ndarray] | None = None  # the second judge on: label (`judge2`, ...) -> toxicity  # per-sample mean NLL of the response under the frozen reference


class ToxicityEvaluation(Callback):
    """Evaluate toxicity (and ROUGE) before, during and after PPO; write table, report and adapter.

    Args:
        num_prompts: held-out prompts from the data module's test split (capped, with a warning,
            at the split's size).
        every_n_iterations: also evaluate every N PPO iterations; 0: only before and after. When
            the last iteration is a multiple of N, its evaluation is also the final one (run once).
        max_new_tokens: response cap (the notebook's evaluation uses 100).
        samples_per_prompt: responses per prompt; a prompt's toxicity is their mean.
        seed: generation seed, the same for every evaluation so before and after are paired.
        text: what the toxicity classifiers see, built as the reward's texts (`reward_texts`):
            `query_response` (`query + response`, the notebook's evaluation) or `response` (the
            summary alone). Long texts are cut as the classifier cuts them (`HFClassifierReward`
            keeps their end, so the response is never cut before the query).
        judge: a second classifier (e.g. ProfanityCheckReward) that also scores the responses, to
            reveal reward hacking, or a list of them (each reported with its own figures, as
            `eval/judge_...`, `eval/judge2_...`, ...); None: the reward component only. The rollout
            monitor and the prediction writer use the first.
        best_adapter_judge: whose toxicity may not rise for a best adapter: `judge` (the first),
            `judge2`, ...
        table_rows: prompts in the before/after table.
        bootstrap_resamples: resamples of the paired bootstrap.
        batch_size: prompts per generate call.
        export_adapter: at fit end, save the trained adapter to `<log_dir>/adapter`.
        show_examples: before/after examples printed at the end (the table's top rows).
        export_best_adapter: also save `<log_dir>/adapter_best`: of the policies evaluated during
            fit, the one of lowest toxicity among those whose toxicity CI lies below 0, whose
            ROUGE-L fell by at most `max_rouge_drop` and whose judge toxicity did not rise
            (`detox_lightning.evaluation.best_adapter`); none when none qualifies. The report says why.
        max_rouge_drop: the largest fall of ROUGE-L (absolute) a best adapter may have.
        plots: at each evaluation, the before/after toxicity distributions as TensorBoard
            histograms (`eval/toxicity_hist_before`, `..._after`) and `toxicity_before_after.png`.
        fluency: also score each response's perplexity under the frozen reference (one more
            teacher-forced pass per sample), reported as `eval/perplexity` with a paired CI of
            the change in mean log-perplexity.
        evaluator_model_name_or_path: score fluency under this causal LM instead of the reference
            (the literature's choice, e.g. `gpt2-xl` as DExperts): the prompt and the decoded
            response, retokenised with its own tokenizer. None: the reference, on the sampled tokens.
        evaluator_dtype: the evaluator's weights, `float32` or `bfloat16`.

    Besides mean toxicity it reports the RealToxicityPrompts protocol's figures over each prompt's
    `samples_per_prompt` samples (`detox_lightning.evaluation.protocol`): expected maximum
    toxicity and toxicity probability for the reward's classifier and the judge, distinct-1/2/3,
    and fluency, each with the paired bootstrap CI of its change where it is per prompt.
    """

    def __init__(
        self,
        num_prompts: int = 256,
        every_n_iterations: int = 0,
        max_new_tokens: int = 100,
        samples_per_prompt: int = 1,
        seed: int = 1234,
        text: RewardText = "query_response",
        judge: RewardModel | list[RewardModel] | None = None,
        best_adapter_judge: str = "judge",
        table_rows: int = 20,
        bootstrap_resamples: int = 2000,
        batch_size: int = 16,
        export_adapter: bool = True,
        show_examples: int = 3,
        export_best_adapter: bool = True,
        max_rouge_drop: float = 0.02,
        plots: bool = True,
        fluency: bool = True,
        evaluator_model_name_or_path: str | None = None,
        evaluator_dtype: str = "float32",
    ) -> None:
        problems = [
            f"{name}={value} must be at least {low}"
            for name, value, low in (
                ("num_prompts", num_prompts, 2),
                ("every_n_iterations", every_n_iterations, 0),
                ("max_new_tokens", max_new_tokens, 1),
                ("samples_per_prompt", samples_per_prompt, 1),
                ("bootstrap_resamples", bootstrap_resamples, 1),
                ("batch_size", batch_size, 1),
            )
            if value < low
        ]
        if text not in get_args(RewardText):
            problems.append(f"text={text!r} must be one of {list(get_args(RewardText))}")
        if not (isinstance(max_rouge_drop, (int, float)) and math.isfinite(max_rouge_drop) and max_rouge_drop >= 0):
            problems.append(f"max_rouge_drop={max_rouge_drop!r} must be a number of at least 0")
        judges = [] if judge is None else list(judge) if isinstance(judge, (list, tuple)) else [judge]
        self.judges = {("judge" if i == 0 else f"judge{i + 1}"): model for i, model in enumerate(judges)}
        if self.judges and best_adapter_judge not in self.judges:
            problems.append(f"best_adapter_judge={best_adapter_judge!r} is not one of {list(self.judges)}")
        if problems:
            raise ConfigError("ToxicityEvaluation: " + "; ".join(problems))
        self.num_prompts = num_prompts
        self.every_n_iterations = every_n_iterations
        self.max_new_tokens = max_new_tokens
        self.samples_per_prompt = samples_per_prompt
        self.seed = seed
        self.text = text
        self.judge = judges[0] if judges else None  # the first: what the monitor and predictions use
        self.best_adapter_judge = best_adapter_judge
        self.table_rows = table_rows
        self.bootstrap_resamples = bootstrap_resamples
        self.batch_size = batch_size
        self.export_adapter = export_adapter
        self.show_examples = show_examples
        self.export_best_adapter, self.max_rouge_drop, self.plots = export_best_adapter, max_rouge_drop, plots
        self.fluency = fluency
        self.evaluator = (
            EvaluatorLM(evaluator_model_name_or_path, evaluator_dtype, batch_size)
            if fluency and evaluator_model_name_or_path is not None
            else None
        )
        self.candidates: list[Candidate] = []  # this run's policy evaluations, for adapter_best/ (kept across a resume)
        self.best_weights: dict[str, torch.Tensor] | None = None  # the trainable tensors of the best candidate so far
        self._resumed = False  # state came from a checkpoint: the next fit start keeps the candidates
        self.before: Outputs | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_outputs: Outputs | None = None
        self.last_step: int | None = None  # iteration of the latest policy evaluation of this run
        # The iteration whose periodic evaluation is due. It runs when every callback has finished
        # with that iteration (at the next batch's start, or at fit end), so that a monitor's
        # rollback at its end is evaluated whatever the order of the callbacks.
        self.due: int | None = None

    @property
    def scoring(self) -> Scoring:
        """What the other callbacks score as (`evaluation.scoring.run_scoring` finds it)."""
        return Scoring(self.text, self.judge, self.max_new_tokens)

    # ---- generation and scoring ----

    def prompt_batches(self, trainer: pl.Trainer, device: torch.device) -> list[dict]:
        data = trainer.datamodule
        if data.test_dataset is None:
            data.setup("test")
        n = self.num_prompts
        if n > len(data.test_dataset):
            rank_zero_warn(
                f"ToxicityEvaluation: num_prompts={n} exceeds the {len(data.test_dataset)} test prompts; using all of them"
            )
            n = len(data.test_dataset)
        rows = data.test_dataset.select(range(n))
        batches = []
        for start in range(0, n, self.batch_size):
            batch = data.collate([rows[i] for i in range(start, min(start + self.batch_size, n))])
            batch["input_ids"] = batch["input_ids"].to(device)
            batch["attention_mask"] = batch["attention_mask"].to(device)
            batches.append(batch)
        return batches

    @torch.no_grad()
    def generate_and_score(self, trainer: pl.Trainer, module: pl.LightningModule, reference: bool) -> Outputs:
        """Sample every prompt `samples_per_prompt` times under a fixed seed, then score.

        Under data parallelism each rank takes every `world_size`-th batch and the per-prompt
        figures are gathered: every rank returns the same Outputs. Each batch is seeded with
        `seed + batch index`, so the figures do not depend on the number of ranks.
        """
        batches = self.prompt_batches(trainer, module.device)
        rank, world = trainer.global_rank, trainer.world_size
        mine = [(i, batches[i]) for i in range(rank, len(batches), world)]
        k = self.samples_per_prompt
        index, queries, summaries, responses, lengths, log_ppls = [], [], [], [], [], []
        devices = [module.device] if module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for b, batch in mine:
                torch.manual_seed(self.seed + b)
                per_sample, per_sample_ppl = [], []
                for _ in range(k):
                    samples = module.sample(
                        batch["input_ids"], batch["attention_mask"], self.max_new_tokens, reference=reference
                    )
                    texts = module.decode(samples.response_ids)
                    per_sample.append((texts, samples.mask.sum(dim=1).tolist()))
                    if self.evaluator is not None:
                        per_sample_ppl.append(self.evaluator.log_perplexity(batch["query"], texts).tolist())  # (B,)
                    elif self.fluency:
                        per_sample_ppl.append(self.log_perplexity(module, batch, samples))  # (B,)
                queries += batch["query"]
                summaries += batch.get("summary") or [None] * len(batch["query"])
                index += [b * self.batch_size + i for i in range(len(batch["query"]))]
                for i in range(len(batch["query"])):
                    responses.append([texts[i] for texts, _ in per_sample])
                    lengths.append([lens[i] for _, lens in per_sample])
                    if self.fluency:
                        log_ppls.append([float(ppl[i]) for ppl in per_sample_ppl])
        flat_q = [q for q in queries for _ in range(k)]
        flat_r = [r for rs in responses for r in rs]
        shape = (len(queries), k)

        def toxicity(scorer: RewardModel) -> np.ndarray:
            if not flat_r:  # a rank without a batch (fewer batches than ranks)
                return np.zeros(shape)
            return toxicity_of(scorer, flat_q, flat_r, self.text).reshape(shape)

        rouge = None
        has_summaries = all(s is not None for s in summaries)
        if flat_r and has_summaries:
            refs = [s for s in summaries for _ in range(k)]
            scores = Rouge(keep_in_memory=True).compute(predictions=flat_r, references=refs)
            rouge = {name: np.asarray(v).reshape(shape) for name, v in scores.items()}
        shard = Outputs(
            queries=queries,
            responses=responses,
            toxicity=toxicity(module.reward),
            reward=module.reward(flat_q, flat_r).cpu().numpy().reshape(shape) if flat_r else np.zeros(shape),
            length=np.asarray(lengths, dtype=np.float64).reshape(shape),
            judge_toxicity=toxicity(self.judge) if self.judge is not None else None,
            more_judges={label: toxicity(model) for label, model in list(self.judges.items())[1:]} or None,
            rouge=rouge,
            log_ppl=np.asarray(log_ppls, dtype=np.float64).reshape(shape) if self.fluency else None,
        )
        outputs = gather_outputs(index, shard, has_summaries) if world > 1 else shard
        if outputs.rouge is None:
            rank_zero_warn("ToxicityEvaluation: the test split has no 'summary' column; ROUGE is skipped")
        return outputs

    @staticmethod
    def log_perplexity(module: pl.LightningModule, batch: dict, samples) -> list[float]:
        """(B,) each sample's mean NLL under the frozen reference, dropout off; NaN when empty."""
        was_training = module.policy.training
        module.policy.eval()
        try:
            with reference_mode(module.policy):
                out = response_log_perplexity(
                    module.policy, module.arch, batch["input_ids"], batch["attention_mask"], samples.response_ids,
                    samples.mask,
                )
        finally:
            module.policy.train(was_training)
        return out.cpu().tolist()

    # ---- figures ----

    def compare(self, after: Outputs) -> dict[str, float]:
        """Flat `eval/...` metrics of `after`, with deltas against `self.before`."""
        before = self.before
        metrics = {}
        scored = [("toxicity", before.toxicity, after.toxicity)]
        if after.judge_toxicity is not None:
            scored.append(("judge_toxicity", before.judge_toxicity, after.judge_toxicity))
        for label, values in (after.more_judges or {}).items():
            scored.append((f"{label}_toxicity", before.more_judges[label], values))
        for name, b, a in scored:
            stats_b, stats_a = summarize(b), summarize(a)
            for key, value in stats_a.items():
                metrics[f"eval/{name}_{key}"] = value
            delta, low, high = paired_bootstrap_ci(
                b.mean(axis=1), a.mean(axis=1), resamples=self.bootstrap_resamples, seed=self.seed
            )
            metrics[f"eval/{name}_delta"] = delta
            metrics[f"eval/{name}_delta_ci_low"] = low
            metrics[f"eval/{name}_delta_ci_high"] = high
            metrics[f"eval/{name}_mean_improvement_pct"] = improvement_pct(stats_b["mean"], stats_a["mean"])
            metrics[f"eval/{name}_std_improvement_pct"] = improvement_pct(stats_b["std"], stats_a["std"])
            # the RealToxicityPrompts figures over each prompt's k samples, paired over prompts
            metrics[f"eval/{name}_exp_max"], metrics[f"eval/{name}_exp_max_std"] = protocol.expected_max_toxicity(a)
            metrics[f"eval/{name}_prob"] = protocol.toxicity_probability(a)
            for figure, per_prompt in (("exp_max", protocol.max_toxicity), ("prob", protocol.any_toxic)):
                metrics |= self.paired_delta(f"eval/{name}_{figure}", per_prompt(b), per_prompt(a))
        for n in (1, 2, 3):
            b_dist, a_dist = protocol.distinct_n(before.responses, n), protocol.distinct_n(after.responses, n)
            metrics[f"eval/dist{n}"] = float(np.nanmean(a_dist)) if np.isfinite(a_dist).any() else float("nan")
            metrics[f"eval/dist{n}_delta"] = metrics[f"eval/dist{n}"] - (
                float(np.nanmean(b_dist)) if np.isfinite(b_dist).any() else float("nan")
            )
        if after.log_ppl is not None and before.log_ppl is not None:
            fluency = protocol.fluency(after.log_ppl)
            metrics["eval/perplexity"], metrics["eval/log_perplexity"] = fluency["perplexity"], fluency["log_perplexity"]
            b_ppl = protocol.per_prompt_log_perplexity(before.log_ppl)
            a_ppl = protocol.per_prompt_log_perplexity(after.log_ppl)
            both = np.isfinite(b_ppl) & np.isfinite(a_ppl)  # prompts with a non-empty sample on both sides
            if both.any():
                metrics |= self.paired_delta("eval/log_perplexity", b_ppl[both], a_ppl[both])
        metrics["eval/reward_mean"] = float(after.reward.mean())
        metrics["eval/response_len_mean"] = float(after.length.mean())
        if after.rouge is not None:
            for name, values in after.rouge.items():
                metrics[f"eval/{name}"] = float(values.mean())
                metrics[f"eval/{name}_delta"] = float(values.mean() - before.rouge[name].mean())
        return metrics

    def paired_delta(self, name: str, before: np.ndarray, after: np.ndarray) -> dict[str, float]:
        """`name`_delta with its paired bootstrap 95% CI over prompts (`_ci_low`, `_ci_high`)."""
        delta, low, high = paired_bootstrap_ci(before, after, resamples=self.bootstrap_resamples, seed=self.seed)
        return {f"{name}_delta": delta, f"{name}_delta_ci_low": low, f"{name}_delta_ci_high": high}

    def describe(self, label: str, metrics: dict[str, float], n: int) -> str:
        """One line: mean toxicity with its CI against before, ROUGE-L and length."""
        m = metrics
        line = (
            f"eval {label} ({n} prompts x {self.samples_per_prompt}): toxicity {m['eval/toxicity_mean']:.4f} "
            f"± {m['eval/toxicity_std']:.4f}, delta {m['eval/toxicity_delta']:+.4f} "
            f"[95% CI {m['eval/toxicity_delta_ci_low']:+.4f}, {m['eval/toxicity_delta_ci_high']:+.4f}], "
            f"improvement {_pct(m['eval/toxicity_mean_improvement_pct'])} mean / "
            f"{_pct(m['eval/toxicity_std_improvement_pct'])} std, >0.5: {m['eval/toxicity_frac_above_0.5']:.1%}"
        )
        if "eval/judge_toxicity_mean" in m:
            line += (
                f" | judge {m['eval/judge_toxicity_mean']:.4f}, delta {m['eval/judge_toxicity_delta']:+.4f} "
                f"[{m['eval/judge_toxicity_delta_ci_low']:+.4f}, {m['eval/judge_toxicity_delta_ci_high']:+.4f}]"
            )
        if "eval/toxicity_exp_max" in m:
            line += (
                f" | exp. max. toxicity {m['eval/toxicity_exp_max']:.4f}, delta {m['eval/toxicity_exp_max_delta']:+.4f} "
                f"[{m['eval/toxicity_exp_max_delta_ci_low']:+.4f}, {m['eval/toxicity_exp_max_delta_ci_high']:+.4f}], "
                f"toxicity prob. {m['eval/toxicity_prob']:.3f}"
            )
        if "eval/judge_toxicity_exp_max" in m:
            line += f" (judge {m['eval/judge_toxicity_exp_max']:.4f}, {m['eval/judge_toxicity_prob']:.3f})"
        for judge in list(self.judges)[1:]:
            if f"eval/{judge}_toxicity_mean" in m:
                line += (
                    f" | {judge} {m[f'eval/{judge}_toxicity_mean']:.4f}, delta {m[f'eval/{judge}_toxicity_delta']:+.4f} "
                    f"[{m[f'eval/{judge}_toxicity_delta_ci_low']:+.4f}, {m[f'eval/{judge}_toxicity_delta_ci_high']:+.4f}], "
                    f"exp. max. {m[f'eval/{judge}_toxicity_exp_max']:.4f}"
                )
        if "eval/perplexity" in m:
            line += f" | perplexity {m['eval/perplexity']:.1f}"
            if "eval/log_perplexity_delta" in m:
                line += (
                    f" (log delta {m['eval/log_perplexity_delta']:+.3f} "
                    f"[{m['eval/log_perplexity_delta_ci_low']:+.3f}, {m['eval/log_perplexity_delta_ci_high']:+.3f}])"
                )
        if "eval/dist1" in m:
            line += f" | dist-1/2/3 {m['eval/dist1']:.3f}/{m['eval/dist2']:.3f}/{m['eval/dist3']:.3f}"
        if "eval/rougeL" in m:
            line += f" | ROUGE-L {m['eval/rougeL']:.4f} ({m['eval/rougeL_delta']:+.4f})"
        return line + f" | length {m['eval/response_len_mean']:.1f}"

    def table(self, after: Outputs) -> list[dict]:
        """The notebook's before/after table: first `table_rows` prompts, sorted by reward gain."""
        rows = []
        for i in range(min(self.table_rows, len(after.queries))):
            rb, ra = float(self.before.reward[i, 0]), float(after.reward[i, 0])
            rows.append(
                dict(zip(TABLE_COLUMNS, [after.queries[i], self.before.responses[i][0], after.responses[i][0], rb, ra, ra - rb]))
            )
        return sorted(rows, key=lambda r: r["reward_diff"], reverse=True)

    # ---- hooks ----

    def evaluate(self, trainer: pl.Trainer, module: pl.LightningModule, step: int, label: str) -> dict[str, float]:
        after = self.generate_and_score(trainer, module, reference=False)
        metrics = self.compare(after)
        self.last_metrics, self.last_outputs, self.last_step = metrics, after, step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        # A rollback (or a skipped iteration) leaves older weights than the iteration count says:
        # the candidate is named after the iteration whose weights it holds.
        held = getattr(module, "weights_iteration", step) if trainer.state.fn == TrainerFn.FITTING else step
        if held != step:
            label += f" (the weights after iteration {held})"
        rank_zero_info(self.describe(label, metrics, len(after.queries)))
        self.keep_candidate(trainer, module, step, held, label, after, metrics)
        return metrics

    def start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        for judge in self.judges.values():
            judge.to(module.device)
        if self.evaluator is not None:
            self.evaluator.to(module.device)
        self.last_outputs, self.last_step = None, None  # a policy evaluation of an earlier run is stale
        resumed, self._resumed = self._resumed, False
        if not resumed:  # a resumed fit chooses adapter_best/ over the whole run, before the resume too
            self.candidates, self.best_weights, self.due = [], None, None
        # The reference, not the policy: after a resume the policy has already moved.
        self.before = self.generate_and_score(trainer, module, reference=True)
        self.before_metrics = self.compare(self.before)
        for logger in trainer.loggers:
            logger.log_metrics(self.before_metrics, step=0)
        rank_zero_info(self.describe("before", self.before_metrics, len(self.before.queries)))
        if resumed and self.best_weights is not None and trainer.state.fn == TrainerFn.FITTING:
            # a resumed run logs to a new directory: the best so far goes there at once, from its own weights
            self.export_best(trainer, module, self.selection().chosen.iteration, self.best_weights)

    # ---- state kept in checkpoints (tensors and plain data: loads with weights_only=True) ----

    def state_dict(self) -> dict:
        return {
            "candidates": [(c.iteration, {k: float(v) for k, v in c.metrics.items()}) for c in self.candidates],
            "best_weights": self.best_weights,
            "due": self.due,  # a checkpoint saved before a due evaluation ran: the resumed run runs it
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.candidates = [Candidate(int(i), dict(m)) for i, m in state_dict.get("candidates", [])]
        self.best_weights = state_dict.get("best_weights")
        self.due = state_dict.get("due")
        self._resumed = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Iterations done, this one included (Lightning counts a batch processed before this
        # hook); restored on resume, unlike a count kept here.
        iteration = iterations_done(trainer)
        if self.every_n_iterations and iteration % self.every_n_iterations == 0:
            self.due = iteration  # evaluated once every callback is done with this iteration

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.due is not None:
            due, self.due = self.due, None
            self.evaluate(trainer, pl_module, due, f"iteration {due}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        iteration = iterations_done(trainer)
        self.due = None  # the final evaluation is the last iteration's periodic one too
        self.finish(trainer, pl_module, iteration, f"after {iteration} iterations")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # `python train.py test --ckpt_path ...`: the checkpoint's policy against the reference.
        self.start(trainer, pl_module)
        self.finish(trainer, pl_module, 0, "checkpoint", export=False)

    def finish(self, trainer, module, step: int, label: str, export: bool | None = None) -> None:
        if self.last_step == step and self.last_outputs is not None:
            # The periodic evaluation already ran at this iteration, and the policy has not moved
            # since: sampling again would cost a full evaluation and log the step twice.
            rank_zero_info(self.describe(label, self.last_metrics, len(self.last_outputs.queries)))
        else:
            self.evaluate(trainer, module, step, label)
        log_dir = trainer.log_dir  # a broadcast from rank 0 under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        out_dir = Path(log_dir or trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = self.table(self.last_outputs)
        write_csv(out_dir / "toxicity_table.csv", rows)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("eval/before_after", markdown_table(rows), step)
        report = self.report(trainer, module, step, log_dir)
        selection = self.selection() if self.candidates else None
        if selection is not None:
            report["best_adapter"] = selection.as_dict()
        write_text(out_dir / "evaluation_report.json", json.dumps(report, indent=2, default=str))
        for row in rows[: self.show_examples]:
            rank_zero_info(
                f"example (reward {row['reward_before']:+.2f} -> {row['reward_after']:+.2f}): "
                f"{row['response_before'].strip()!r} -> {row['response_after'].strip()!r}"
            )
        written = ["toxicity_table.csv", "evaluation_report.json"]
        if self.plots:
            written.append(pictures.PNG_NAME)
        if self.export_adapter if export is None else export:
            export_adapter(module, out_dir / "adapter", model_card(module, report))
            written.append("adapter/")
        if selection is not None and self.export_best_adapter:
            for line in selection.lines():
                rank_zero_info(line)
            if selection.chosen is not None:
                written.append("adapter_best/")
        rank_zero_info(f"wrote {', '.join(written)} in {out_dir}; TensorBoard: tensorboard --logdir {out_dir.parent}")

    # ---- pictures and the best adapter, after each evaluation ----

    def keep_candidate(
        self, trainer, module, step: int, held: int, label: str, after: Outputs, metrics: dict[str, float]
    ) -> None:
        """Draw the evaluation (at logging step `step`); during fit, make it a candidate named
        `held` (the iteration whose weights it holds) and export it as adapter_best/ if it is the
        best so far.

        Exported at once rather than at the end, so a stopped or crashed run keeps it; the choice
        among the candidates so far is the final choice's rule, so the last export is the final one.
        """
        log_dir = trainer.log_dir  # a broadcast from rank 0 under DDP: every rank evaluates, so every rank asks
        out_dir = Path(log_dir or trainer.default_root_dir)
        if self.plots and trainer.is_global_zero:
            scores = {"toxicity": (self.before.toxicity, after.toxicity)}
            if after.judge_toxicity is not None:
                scores["judge_toxicity"] = (self.before.judge_toxicity, after.judge_toxicity)
            pictures.log_histograms(trainer.loggers, scores, step)
            out_dir.mkdir(parents=True, exist_ok=True)
            pictures.write_png(out_dir / pictures.PNG_NAME, scores, metrics, label)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        # one candidate per weights: a resumed run that ends where it resumed evaluates them again
        self.candidates = [c for c in self.candidates if c.iteration != held] + [Candidate(held, metrics)]
        chosen = self.selection().chosen
        if chosen is not None and chosen.iteration == held:
            # its weights travel in checkpoints, so a resumed run can still export it
            self.best_weights = {name: p.detach().cpu().clone() for name, p in module.trainable_parameters().items()}
            self.export_best(trainer, module, held)

    def export_best(self, trainer, module, iteration: int, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Write `<log_dir>/adapter_best` from the policy's current weights, or from `weights`."""
        log_dir = trainer.log_dir  # a broadcast from rank 0 under DDP: every rank must ask
        if not (self.export_best_adapter and trainer.is_global_zero):
            return
        report = self.report(trainer, module, iteration, log_dir)
        report["after"] = next(c.metrics for c in self.candidates if c.iteration == iteration)  # its own figures
        report["iteration"] = report["weights_iteration"] = iteration
        card = model_card(module, report)
        card += f"\nThe best of this run's evaluations (iteration {iteration}); see `best_adapter` in evaluation_report.json.\n"
        with holding_weights(module, weights):
            export_adapter(module, Path(log_dir or trainer.default_root_dir) / "adapter_best", card)

    def selection(self):
        return select_best(self.candidates, self.max_rouge_drop, judge=self.best_adapter_judge if self.judges else None)

    def report(self, trainer: pl.Trainer, module: pl.LightningModule, step: int, log_dir: str | None = None) -> dict:
        """The JSON report; pass `log_dir` when only rank 0 calls this (`trainer.log_dir` is a collective)."""
        import lightning
        import peft
        import transformers
        import trl

        config_file = Path((log_dir if log_dir is not None else trainer.log_dir) or "") / "config.yaml"
        return {
            "iteration": step,
            "weights_iteration": getattr(module, "weights_iteration", step),  # older after a rollback or a skip
            "num_prompts": len(self.before.queries),
            "samples_per_prompt": self.samples_per_prompt,
            "seed": self.seed,
            "scored_text": self.text,
            "data": data_description(getattr(trainer, "datamodule", None)),
            "max_new_tokens": self.max_new_tokens,
            "before": self.before_metrics,
            "after": self.last_metrics,
            "policy": asdict(module.policy_config),
            "policy_dtype": str(module.policy.pretrained_model.get_input_embeddings().weight.dtype).removeprefix("torch."),
            "estimator": module.estimator.describe() if hasattr(module, "estimator") else None,
            "reward": type(module.reward).__name__,
            "judge": type(self.judge).__name__ if self.judge is not None else None,
            "judges": {label: type(model).__name__ for label, model in self.judges.items()},
            "best_adapter_judge": self.best_adapter_judge if self.judges else None,
            # the arithmetic each classifier that judged scored with (e.g. float32, int8-dynamic)
            "reward_precision": describe_precision(module.reward),
            "judge_precision": describe_precision(self.judge),
            "judges_precision": {label: describe_precision(model) for label, model in self.judges.items()},
            "fluency_evaluator": (
                None if not self.fluency else self.evaluator.name_or_path if self.evaluator is not None else "reference"
            ),
            "config": config_file.read_text() if config_file.is_file() else None,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "lightning": lightning.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "trl": trl.__version__,
            },
        }


def gather_outputs(index: list[int], shard: Outputs, has_summaries: bool) -> Outputs:
    """Every rank's shard, ordered by prompt `index`: the same Outputs on every rank."""
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, (index, shard, has_summaries))
    rows = sorted((i, r, j) for r, (idx, _, _) in enumerate(parts) for j, i in enumerate(idx))
    take = [(parts[r][1], j) for _, r, j in rows]

    def stack(get) -> np.ndarray:
        return np.stack([get(o)[j] for o, j in take]) if take else np.zeros((0, 1))

    rouge_keys = next((list(o.rouge) for _, o, _ in parts if o.rouge is not None), [])
    with_rouge = all(h for _, _, h in parts) and rouge_keys
    return Outputs(
        queries=[o.queries[j] for o, j in take],
        responses=[o.responses[j] for o, j in take],
        toxicity=stack(lambda o: o.toxicity),
        reward=stack(lambda o: o.reward),
        length=stack(lambda o: o.length),
        judge_toxicity=stack(lambda o: o.judge_toxicity) if shard.judge_toxicity is not None else None,
        rouge={name: stack(lambda o, n=name: o.rouge[n]) for name in rouge_keys} if with_rouge else None,
        log_ppl=stack(lambda o: o.log_ppl) if shard.log_ppl is not None else None,
        more_judges={label: stack(lambda o, n=label: o.more_judges[n]) for label in shard.more_judges}
        if shard.more_judges else None,
    )


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict]) -> str:
    def cell(value) -> str:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in TABLE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def data_description(data) -> str:
    """What the policy was trained and evaluated on, as the run's DataModule says: its path, the text
    column and the row filter (a RealToxicityPrompts run must not read as a DialogSum one)."""
    if data is None:
        return "unknown"
    text = f"{getattr(data, 'path', '?')}"
    if getattr(data, "text_column", "dialogue") != "dialogue":
        text += f", text column {data.text_column}"
    if getattr(data, "filter", None):
        text += f", rows with {data.filter}"
    return text


def model_card(module: pl.LightningModule, report: dict) -> str:
    before, after = report["before"], report["after"]
    auto_class = module.arch.auto_model_class().__name__
    with_value_head = module.policy.v_head is not None
    return (
        "# Detoxified adapter (detox_lightning)\n\n"
        f"- base model: `{module.policy_config.model_name_or_path}` ({report['policy_dtype']})\n"
        f"- starting adapter: `{module.policy_config.adapter_name_or_path}`\n"
        f"- data: {report['data']}\n"
        f"- method: {module.ppo.advantage_estimator.upper()} with a KL penalty towards the starting policy; "
        f"reward: {report['reward']} ({report['reward_precision']})\n"
        f"- evaluation ({report['num_prompts']} held-out prompts x {report['samples_per_prompt']}, seed {report['seed']}): "
        f"toxicity {before['eval/toxicity_mean']:.4f} -> {after['eval/toxicity_mean']:.4f}, "
        f"delta {after['eval/toxicity_delta']:+.4f} [95% CI {after['eval/toxicity_delta_ci_low']:+.4f}, "
        f"{after['eval/toxicity_delta_ci_high']:+.4f}]"
        + (f", ROUGE-L {before['eval/rougeL']:.4f} -> {after['eval/rougeL']:.4f}" if "eval/rougeL" in after else "")
        + f"\n\nLoad with `PeftModel.from_pretrained({auto_class}.from_pretrained(base), this_dir)`.\n"
        + ("`value_head.safetensors` holds the PPO value head (not needed for generation).\n" if with_value_head else "")
    )


@contextlib.contextmanager
def holding_weights(module: pl.LightningModule, weights: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Inside, the module's trainable tensors hold `weights` (None: unchanged); put back after."""
    if weights is None:
        yield
        return
    params = module.trainable_parameters()
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name].to(p.device, p.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


def export_adapter(module: pl.LightningModule, directory: Path, card: str) -> None:
    """The policy adapter (PEFT, safetensors) + tokenizer + model card + the PPO value head."""
    v_head = module.policy.v_head  # None with a critic-free estimator
    extra = {"value_head.safetensors": v_head.state_dict()} if v_head is not None else {}
    save_adapter(module.policy.pretrained_model, module.tokenizer, directory, card, extra)


def _pct(value: float) -> str:
    """A percentage, or n/a where it is undefined (the notebook's improvement of a zero baseline)."""
    return "n/a" if math.isnan(value) else f"{value:.1f}%"
