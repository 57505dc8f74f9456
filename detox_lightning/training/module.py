"""The RL detoxification LightningModule: one training batch = one iteration of the chosen estimator.

Glue only: the math lives in `detox_lightning.rl` (the estimator, chosen once from the settings,
owns advantages and loss), the model calls in `rollout` (through the policy's
`architectures.Architecture`), the models in `policy` and `rewards`, the reductions over ranks in
`distributed`, restart and rollback plumbing in `resumable`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from detox_lightning.io.checkpoint import iterations_done
from detox_lightning.models.architectures import architecture_of
from detox_lightning.models.end_tokens import end_token_ids
from detox_lightning.models.engines import EngineError, GenerateEngine, RolloutEngine
from detox_lightning.models.fast_generation import few_row_linears, inverse_cdf_kwargs, merged_lora
from detox_lightning.models.policy import (
    POLICY_ADAPTER,
    PolicyConfig,
    base_dtype,
    build_policy,
    enable_gradient_checkpointing,
    reference_mode,
)
from detox_lightning.models.rollout import RolloutRecord, Samples, logprobs_and_values, score_rollout
from detox_lightning.models.vllm_engine import VLLMEngine
from detox_lightning.models.vllm_server import default_vllm_python
from detox_lightning.offline.builtin import resolve
from detox_lightning.rewards.classifiers import RewardModel
from detox_lightning.rl.controllers import kl_controller
from detox_lightning.rl.estimators import Rollout, build_estimator
from detox_lightning.rl.experience import Experience
from detox_lightning.rl.importance import importance_weights, sampler_mismatch
from detox_lightning.rl.kl import per_token_kl
from detox_lightning.rl.stats import RunningMoments, group_reward_std
from detox_lightning.training.distributed import DataParallelMixin
from detox_lightning.training.guards import SkipCounter, nonfinite_parts
from detox_lightning.training.resumable import ResumableRLMixin
from detox_lightning.training.settings import GenerationSettings, RLSettings, RolloutSettings, check_settings
from detox_lightning.training.trainable_state import TrainableStateMixin
from detox_lightning.trl_compat import masked_mean

PROGRESS_BAR = ("env/reward_mean", "objective/kl")
IN_PROCESS = GenerateEngine()  # the policy's own `generate`: the evaluation's sampler, whatever the rollout engine


class RLDetoxModule(ResumableRLMixin, DataParallelMixin, TrainableStateMixin, pl.LightningModule):
    """KL-penalised RL towards the starting policy (PPO, RLOO, GRPO, REINFORCE++), rewarded by a
    toxicity classifier.

    Args:
        reward: the reward component (`class_path` in YAML), e.g. `HFClassifierReward`.
        policy: the model to fine-tune and its LoRA adapter.
        ppo: RL hyper-parameters, the estimator among them (the YAML key keeps its old name).
        generation: response sampling during training.
        batch_size: prompts per iteration (linked from `data.batch_size`).
        rollout: what samples the rollouts: `generate` or a vLLM server (decoder-only policies).
    """

    def __init__(
        self,
        reward: RewardModel,
        policy: PolicyConfig = PolicyConfig(),  # noqa: B008 - dataclasses are read-only configs here
        ppo: RLSettings = RLSettings(),  # noqa: B008
        generation: GenerationSettings = GenerationSettings(),  # noqa: B008
        batch_size: int = 16,
        rollout: RolloutSettings = RolloutSettings(),  # noqa: B008
    ) -> None:
        super().__init__()
        check_settings(batch_size, ppo, generation, rollout)
        self.automatic_optimization = False
        self.policy_config, self.ppo, self.generation, self.batch_size = policy, ppo, generation, batch_size
        self.estimator = build_estimator(ppo, max_completion_length=generation.output_max_length)
        rank_zero_info(self.estimator.describe())  # where this run's KL and loss differ from the library's defaults
        self.policy, self.tokenizer = build_policy(policy, value_head=self.estimator.needs_value_head)
        self.arch = architecture_of(self.policy.pretrained_model.config)  # seq2seq or causal: see architectures.py
        self.end_token_ids = end_token_ids(self.policy.pretrained_model.generation_config, self.tokenizer)
        self.rollout = rollout
        self.engine = self.build_engine(rollout)
        # generate's logits round as the teacher-forced forward only in float32 (RLSettings docs)
        self.logprobs_from_generate = self.engine.keeps_logits and (
            base_dtype(policy.dtype) == "float32" if ppo.logprobs_from_generate is None else ppo.logprobs_from_generate
        )
        if ppo.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy, zero_dropout=ppo.disable_dropout)
        self.reward = reward
        self.kl_ctl = kl_controller(ppo.init_kl_coef, ppo.adap_kl_ctrl, ppo.target, ppo.horizon)
        self.score_moments = RunningMoments()
        self.skips = SkipCounter()
        self.last_rollout: RolloutRecord | None = None  # this rank's latest rollout, for monitors

    def build_engine(self, rollout: RolloutSettings) -> RolloutEngine:
        """The rollout engine (`models.engines`); a started vLLM server waits for the first rollout."""
        if rollout.engine == "generate":
            return IN_PROCESS
        if not self.arch.vllm_serves:
            raise EngineError(
                f"model.rollout.engine='vllm' serves decoder-only policies; {self.policy_config.model_name_or_path} is "
                f"an encoder-decoder model (vLLM dropped those): use model.rollout.engine=generate"
            )
        if rollout.importance_sampling:  # where this run differs from trl's default correction
            rank_zero_info(
                f"rollout engine vllm: importance weights min(p_trainer / p_vllm, {rollout.importance_sampling_cap:g}) "
                f"{'truncated' if rollout.importance_sampling_mode == 'truncate' else 'masked above the cap'}, "
                f"per {self.estimator.ratio_level} (trl 1.12's GRPO default: vllm_importance_sampling_mode "
                f"sequence_mask, clip_max 3)"
            )
        peft_model = self.policy.pretrained_model
        return VLLMEngine(
            url=rollout.vllm_url,
            python=rollout.vllm_python or default_vllm_python(),
            model_dir=resolve(self.policy_config.model_name_or_path),
            lora_rank=peft_model.peft_config[POLICY_ADAPTER].r,
            dtype=base_dtype(self.policy_config.dtype),
            timeout_s=rollout.timeout_s,
            startup_timeout_s=rollout.startup_timeout_s,
        )

    def teardown(self, stage: str) -> None:
        self.engine.close()  # a vLLM server this run started

    # ---- generation (also used by the evaluation callbacks) ----

    def generation_kwargs(self, max_new_tokens: int, fast: bool | None = None) -> dict:
        """`generate` kwargs; `fast` (default: `generation.fast_sampling`) samples by inverse CDF."""
        g = self.generation
        kwargs = {
            "do_sample": True,
            "top_k": g.top_k,
            "top_p": g.top_p,
            "temperature": g.temperature,
            **self.arch.min_length_kwargs(g.min_length),
            "max_new_tokens": max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.end_token_ids,  # a chat model's end of turn too, not only EOS
        }
        return inverse_cdf_kwargs(kwargs) if (g.fast_sampling if fast is None else fast) else kwargs

    @contextlib.contextmanager
    def generation_weights(self):
        """Around `generate` (policy in eval mode), under `generation.fast_sampling`: the active LoRA
        merged, and the decoding steps' few-row matmuls transposed (fast_generation.py)."""
        if not self.generation.fast_sampling:
            yield
            return
        with merged_lora(self.policy.pretrained_model), few_row_linears(self.policy):
            yield

    @torch.no_grad()
    def sample(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        reference: bool = False,
        keep_logits: bool = False,
    ) -> Samples:
        """Sample responses from the policy (or the frozen reference), dropout off."""
        was_training = self.policy.training
        self.policy.eval()
        kwargs = self.generation_kwargs(max_new_tokens)
        try:
            with reference_mode(self.policy) if reference else contextlib.nullcontext(), self.generation_weights():
                return IN_PROCESS.sample(self.policy, self.arch, input_ids, attention_mask, kwargs, keep_logits)
        finally:
            self.policy.train(was_training)

    @torch.no_grad()
    def sample_rollout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> Samples:
        """Step 1's responses from the rollout engine (`generate`: `sample`; vLLM: the server,
        after syncing the policy adapter). The evaluation samples with `sample`, the same way
        before and after training, whatever the engine."""
        if self.engine.in_process:
            return self.sample(input_ids, attention_mask, max_new_tokens, keep_logits=self.logprobs_from_generate)
        if self.world_size > 1:
            raise EngineError(f"model.rollout.engine='vllm' runs in one trainer process, not {self.world_size} ranks")
        if self.engine.workdir is None:  # the synced adapters and a started server's log, in the run's folder
            run_dir = (self.trainer.log_dir or self.trainer.default_root_dir) if self._trainer is not None else "."
            self.engine.workdir = Path(run_dir) / "vllm"
        return self.engine.sample(self.policy, self.arch, input_ids, attention_mask, self.generation_kwargs(max_new_tokens, fast=False))

    def decode(self, response_ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)

    # ---- one RL iteration ----

    def draw_max_new_tokens(self) -> int:
        g = self.generation
        drawn = int(torch.randint(g.output_min_length, g.output_max_length + 1, (1,)).item())
        # Rank 0's draw on every rank: one cap per global batch, as on one device.
        return int(self.trainer.strategy.broadcast(drawn)) if self._trainer is not None else drawn

    def shape_scores(self, scores: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
        """Optional EOS penalty, running-std scaling and clipping of the reward-model scores."""
        if self.ppo.missing_eos_penalty is not None:
            has_eos = torch.isin(response_ids, torch.tensor(self.end_token_ids, device=response_ids.device)).any(dim=1)
            scores = scores - self.ppo.missing_eos_penalty * (~has_eos).to(scores.dtype)
        if self.ppo.score_scaling:
            self.score_moments.update(self.gather(scores))  # every rank's scores: the same moments everywhere
            scores = scores / (self.score_moments.std + 1e-8)
        if self.ppo.score_clip is not None:
            scores = scores.clamp(-self.ppo.score_clip, self.ppo.score_clip)
        return scores

    @torch.no_grad()
    def make_experience(self, batch: dict) -> tuple[Experience, dict[str, float]]:
        """Steps 1-5: rollout, score, old/reference log-probs (and values), advantages.

        Shapes: P = prompt tokens, T = response tokens, k = `samples_per_prompt`, B*k = this
        rank's responses (k consecutive rows per prompt: a group never spans two ranks).
        """
        ppo, k, estimator = self.ppo, self.ppo.samples_per_prompt, self.estimator
        input_ids = batch["input_ids"].repeat_interleave(k, dim=0)  # (B*k, P): k consecutive rows per prompt
        attention_mask = batch["attention_mask"].repeat_interleave(k, dim=0)  # (B*k, P)
        queries = [q for q in batch["query"] for _ in range(k)]  # B*k strings

        # 1. rollout: one batched generate
        max_new_tokens = self.draw_max_new_tokens()
        samples = self.sample_rollout(input_ids, attention_mask, max_new_tokens)
        ids, mask = samples.response_ids, samples.mask  # (B*k, T) tokens, (B*k, T) bool: up to the first EOS

        # 2. score with the reward component
        responses = self.decode(ids)  # B*k strings
        raw_scores = self.reward(queries, responses).to(self.device, torch.float32)  # (B*k,)
        scores = self.shape_scores(raw_scores, ids)  # (B*k,)

        # 3. old log-probs (and values) from the policy, reference log-probs from the frozen reference.
        # From a forward pass: in the first update epoch's micro-batches, so that its first forward
        # repeats them bit for bit (bf16 rounds differently for other shapes). From generate: only
        # the reference's pass is left, in chunks of similar length (less padding).
        self.policy.eval()
        first_epoch = self.update_batches(input_ids.shape[0])
        chunks = ppo.mini_batch_size if self.logprobs_from_generate else [m for mini in first_epoch for m in mini]
        token_scores = score_rollout(
            self.policy, self.arch, samples, input_ids, attention_mask, self.generation.temperature, chunks,
            partial(reference_mode, self.policy), with_full_kl=ppo.kl_penalty == "full",
            with_reference=estimator.needs_reference,
        )
        sampler_logprobs = samples.sampler_logprobs  # (B*k, T) vLLM's log-probs; None from generate
        del samples  # with its (B*k, T, V) step logits
        fmask = mask.float()  # (B*k, T)
        logprobs, ref_logprobs = token_scores.logprobs, token_scores.ref_logprobs  # (B*k, T); ref None without the pass
        is_weights = None  # (B*k, T) truncated p_trainer / p_sampler, for a separate sampler
        if sampler_logprobs is not None and self.rollout.importance_sampling:
            r = self.rollout
            is_weights = importance_weights(
                logprobs, sampler_logprobs, fmask, r.importance_sampling_cap, r.importance_sampling_mode, estimator.ratio_level
            )
        kl = None  # (B*k, T) the chosen KL estimate per token, None without a reference pass
        if ref_logprobs is not None:
            kl = token_scores.full_kl if ppo.kl_penalty == "full" else per_token_kl(logprobs, ref_logprobs, ppo.kl_penalty)

        # 4-5. rewards and advantages of the chosen estimator
        rollout = Rollout(scores=scores, mask=fmask, kl=kl, values=token_scores.values, kl_coef=self.kl_ctl.value)
        advantages, returns = estimator.advantages(rollout, self.all_reduce_sum)  # (B*k, T) each; returns may be None
        experience = Experience(
            input_ids=input_ids,
            attention_mask=attention_mask,
            padding_side=self.arch.padding_side,
            response_ids=ids,
            mask=fmask,
            logprobs=logprobs,
            advantages=advantages,
            values=token_scores.values,  # (B*k, T), None without a value head
            returns=returns,
            ref_logprobs=ref_logprobs,
            is_weights=is_weights,
            first_epoch=first_epoch,
        )

        # Statistics of the global batch, the same on every rank: per-response figures gathered,
        # per-token ones as global sums over the global token count.
        kl_sum = ((logprobs - ref_logprobs) * fmask).sum(dim=1) if ref_logprobs is not None else None  # (B*k,)
        self.last_rollout = RolloutRecord(
            queries=queries,
            responses=responses,
            response_ids=ids.cpu(),
            mask=mask.cpu(),
            max_new_tokens=max_new_tokens,
            end_token_ids=self.end_token_ids,
            scores=raw_scores.cpu(),
            kl=kl_sum.cpu() if kl_sum is not None else None,
        )
        stats = self.rollout_stats(token_scores.entropy, kl_sum, raw_scores, scores, attention_mask, experience)
        if sampler_logprobs is not None:
            stats.update(self.sampler_stats(logprobs, sampler_logprobs, fmask, is_weights))
        return experience, stats

    def sampler_stats(
        self, logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, fmask: torch.Tensor, is_weights: torch.Tensor | None
    ) -> dict[str, float]:
        """How far the sampler (vLLM) is from the trainer, over every rank's response tokens (B*k, T each)."""
        parts = sampler_mismatch(logprobs, sampler_logprobs, fmask)
        if is_weights is not None:
            r = self.rollout
            uncapped = importance_weights(logprobs, sampler_logprobs, fmask, math.inf, "truncate", self.estimator.ratio_level)
            parts["weight"] = (is_weights * fmask).sum()
            parts["capped"] = ((uncapped > r.importance_sampling_cap).float() * fmask).sum()
        sums = dict(zip(parts, self.all_reduce_sum(torch.stack(list(parts.values()))).tolist(), strict=True))
        tokens = max(sums.pop("tokens"), 1.0)
        names = {"abs_diff": "sampling/logprob_abs_diff", "kl_k1": "sampling/kl_k1", "kl_k3": "sampling/kl_k3",
                 "weight": "sampling/importance_weight_mean", "capped": "sampling/importance_weight_capped_frac"}
        stats = {names[name]: value / tokens for name, value in sums.items()}
        stats["sampling/adapter_syncs"] = float(getattr(self.engine, "syncs", 0))  # adapters the server loaded so far
        return stats

    def update_batches(self, rows: int) -> list[list[torch.Tensor]]:
        """One epoch of shuffled mini-batches, each split into its gradient-accumulation micro-batches."""
        ppo = self.ppo
        micro_size = ppo.mini_batch_size // ppo.gradient_accumulation_steps
        return [mini.split(micro_size) for mini in torch.randperm(rows, device=self.device).split(ppo.mini_batch_size)]

    def rollout_stats(
        self,
        entropy: torch.Tensor,
        kl_sum: torch.Tensor | None,
        raw_scores: torch.Tensor,
        scores: torch.Tensor,
        attention_mask: torch.Tensor,
        exp: Experience,
    ) -> dict[str, float]:
        """trl-named statistics of the global batch (every rank's rows), the same on every rank.

        Args:
            entropy: (B*k, T) the policy's entropy per token; kl_sum: (B*k,) summed KL or None;
            raw_scores, scores: (B*k,) before and after `shape_scores`; attention_mask: (B*k, P).
        """
        fmask = exp.mask  # (B*k, T)
        zeros = torch.zeros_like(raw_scores)  # (B*k,)
        per_row = torch.stack(
            [kl_sum if kl_sum is not None else zeros, (entropy * fmask).sum(dim=1), raw_scores, scores,
             fmask.sum(dim=1), attention_mask.sum(dim=1).float()], dim=1
        )  # (B*k, 6)
        kl_sum_all, entropy, all_raw, all_scores, response_len, query_len = self.gather(per_row).unbind(dim=1)
        stats = {
            "objective/kl_coef": self.kl_ctl.value,
            "objective/entropy": entropy.mean(),
            "env/reward_mean": all_raw.mean(),
            "env/reward_std": all_raw.std() if all_raw.numel() > 1 else torch.zeros(()),
            "ppo/scores_mean": all_scores.mean(),
            "tokens/responses_len_mean": response_len.mean(),
            "tokens/queries_len_mean": query_len.mean(),
        }
        if kl_sum is not None:
            stats["objective/kl"] = kl_sum_all.mean()  # trl's objective/kl: summed per response
        k = self.ppo.samples_per_prompt
        if k > 1:
            group_std = group_reward_std(all_raw, k)  # (global prompts,): gathered rows keep whole groups in order
            stats["env/group_reward_std"] = group_std.mean()  # trl's reward_std
            stats["env/frac_reward_zero_std"] = torch.isclose(group_std, torch.zeros_like(group_std)).float().mean()
        stats.update(self.estimator.advantage_stats(exp, self.all_reduce_sum))
        return {name: float(value) for name, value in stats.items()}

    def update_mode(self) -> None:
        """Eval mode unless dropout is wanted or checkpointing needs train mode (its dropout is 0 then).

        Eval mode is the switch that reaches every dropout (T5's attention dropout is a float, not
        an nn.Dropout); gradients flow the same.
        """
        self.policy.train(not self.ppo.disable_dropout or self.ppo.gradient_checkpointing)

    def update(self, exp: Experience) -> dict[str, float]:
        """Step 6: `ppo_epochs` passes over shuffled mini-batches; one optimizer step each."""
        ppo, estimator = self.ppo, self.estimator
        optimizer = self.optimizers()
        self.update_mode()
        stats = defaultdict(list)
        for epoch in range(ppo.ppo_epochs):
            # the first epoch in the micro-batches the rollout was scored in: ratio exactly 1 before any step
            mini_batches = exp.first_epoch if epoch == 0 and exp.first_epoch else self.update_batches(exp.mask.shape[0])
            for micro_batches in mini_batches:
                # the token count a token-level loss is divided by, the same for every micro-batch of
                # the step, so gradient accumulation adds up to the update without it
                num_items = None
                if estimator.token_normaliser != "sequences":
                    num_items = float(exp.mask[torch.cat(micro_batches)].sum())  # this rank's mini-batch tokens
                    if estimator.token_normaliser == "step":
                        num_items = float(self.all_reduce_sum(torch.tensor(num_items, device=self.device))) / self.world_size
                for i, micro_idx in enumerate(micro_batches):
                    mb = exp.select(micro_idx)  # b rows, trimmed to (b, p) prompts and (b, t) responses
                    _, mb_logprobs, mb_vpred = logprobs_and_values(
                        self.policy,
                        self.arch,
                        mb.input_ids,
                        mb.attention_mask,
                        mb.response_ids,
                        mb.mask,
                        self.generation.temperature,
                    )  # (b, t, V) unused, (b, t), (b, t) or None without a value head
                    loss, mb_stats = estimator.loss(mb, mb_logprobs, mb_vpred, self.kl_ctl.value, num_items)
                    with self.gradient_sync(i == len(micro_batches) - 1):
                        # a token-sum loss already counts the whole mini-batch; a mean is averaged over micro-batches
                        self.manual_backward(loss if num_items is not None else loss / ppo.gradient_accumulation_steps)
                    with torch.no_grad():
                        log_ratio = mb_logprobs - mb.logprobs  # (b, t)
                        mb_stats["ppo/policy/ratio_mean"] = masked_mean(torch.exp(log_ratio), mb.mask)
                        mb_stats["ppo/policy/approxkl"] = 0.5 * masked_mean(log_ratio.square(), mb.mask)
                        for name, value in mb_stats.items():
                            stats[name].append(value.detach())
                if ppo.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=ppo.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad()
        # One reduction over ranks and one host sync for all statistics, after the loop.
        stats["ppo/policy/ratio_first"] = stats["ppo/policy/ratio_mean"][:1]
        means = torch.stack([torch.stack(v).mean() for v in stats.values()])
        means = (self.all_reduce_sum(means) / self.world_size).tolist()
        return dict(zip(stats.keys(), means, strict=True))

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self.restore_resumed_rng()
        guard = self.skips
        before = self.snapshot()
        t0 = time.perf_counter()
        experience, stats = self.make_experience(batch)
        t1 = time.perf_counter()
        # Every rank takes the same branch: a skip anywhere is a skip everywhere (DDP's gradient
        # all-reduce needs every rank in the update).
        bad = self.on_any_rank(nonfinite_parts(experience, stats))
        if not bad:
            stats.update(self.update(experience))
            bad = [] if math.isfinite(stats["ppo/loss/total"]) else ["loss"]
            if not all(torch.isfinite(p).all() for p in self.trainable_parameters().values()):
                bad.append("updated weights")
            bad = self.on_any_rank(bad)
        t2 = time.perf_counter()
        if bad:
            # A poisoned iteration leaves no trace: weights, optimizer and score statistics roll back.
            # Its statistics are still logged (NaN where they were), so the plots show what happened.
            self.restore(before)
            guard.skip(bad, self.ppo.max_consecutive_skips)
        else:
            guard.consecutive = 0
            self.weights_iteration = iterations_done(self.trainer) + 1  # Lightning counts this batch after the step
            # 7. adapt the KL coefficient to the KL of the global batch (the same on every rank)
            if "objective/kl" in stats:  # absent only without a reference pass (a coefficient fixed at 0)
                responses = self.batch_size * self.ppo.samples_per_prompt * self.world_size
                self.kl_ctl.update(stats["objective/kl"], responses)
        stats["ppo/skipped_iterations"] = guard.total
        stats["time/rollout"], stats["time/update"] = t1 - t0, t2 - t1
        for name, value in stats.items():
            # Statistics are already global; only the timings differ per rank (logged as their mean).
            self.log(
                name,
                value,
                on_step=True,
                on_epoch=False,
                prog_bar=name in PROGRESS_BAR,
                batch_size=self.batch_size,
                sync_dist=name.startswith("time/"),
            )

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Nothing per batch: `python train.py test` is evaluated as a whole by the
        `ToxicityEvaluation` callback (same prompts, seed and pairing as during fit)."""

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Nothing per batch: `python train.py predict` is sampled (through `sample` and `decode`),
        scored and written by the `PredictionWriter` callback, whose summary cap is the
        evaluation's, a setting of the callbacks that this module does not know."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.ppo.learning_rate, weight_decay=self.ppo.weight_decay)


PPODetoxModule = RLDetoxModule  # the name before RLOO, GRPO and REINFORCE++ joined PPO; old configs still run
