"""The RL module's typed settings (YAML `model.init_args.ppo` / `.generation`) and their checks."""

from __future__ import annotations

from dataclasses import dataclass

from detox_lightning.errors import ConfigError, out_of_range, raise_problems
from detox_lightning.rl.estimators import estimator_problems, samples_per_prompt_problem
from detox_lightning.rl.estimators.grpo import SCALE_REWARDS, ScaleRewards
from detox_lightning.rl.importance import IMPORTANCE_MODES, ImportanceMode
from detox_lightning.rl.kl import KL_PENALTIES, KLPenalty
from detox_lightning.rl.losses import GRPO_LOSS_TYPES, GRPOLossType


@dataclass
class GenerationSettings:
    """How responses are sampled during training (the notebook's settings by default).

    Args:
        min_length: minimum decoder length, start token included (as `generate`'s `min_length`).
        output_min_length: each iteration draws its `max_new_tokens` uniformly from
            [output_min_length, output_max_length] (the notebook draws per prompt from [100, 400)).
        output_max_length: upper end of that draw; set both equal for a fixed cap.
        top_k: 0 samples from the whole vocabulary.
        top_p: 1.0 disables nucleus filtering.
        temperature: sampling temperature; log-probs divide the logits by it too.
        fast_sampling: sample with the LoRA merged into the float32 base weights (put back bit for
            bit afterwards), the decoding steps' few-row CPU matmuls as (W @ x.T).T (the same
            product, another summation order), and by inverse CDF instead of `torch.multinomial`
            (`detox_lightning.models.fast_generation`): the same distribution (the CDF in float64,
            exact at 32k-152k vocabularies; merging skipped for non-float32 base weights), another
            random stream, so a seeded run draws other responses than with it off. On by default,
            as it is exact and faster on CPU; `false` samples with `torch.multinomial` as
            `generate` does. Measured in detox_lightning/bench/README.md.
    """

    min_length: int = 5
    output_min_length: int = 100
    output_max_length: int = 400
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    fast_sampling: bool = True


@dataclass
class RolloutSettings:
    """What samples the rollouts (YAML `model.init_args.rollout`).

    Args:
        engine: `generate` (the policy's own `generate`, every architecture) or `vllm` (a vLLM
            server, decoder-only policies: vLLM serves no encoder-decoder model), fed the policy's
            LoRA adapter after every update. The trainer still scores every sampled token itself
            (old and reference log-probs), so the first update's ratio stays exactly 1. vllm runs
            with one trainer process (no DDP yet); the evaluation samples with `generate` either way.
        vllm_url: a running vLLM OpenAI-compatible server (started as `models.vllm_server`
            starts one: `--enable-lora --max-lora-rank R --logprobs-mode processed_logprobs
            --no-enable-chunked-prefill`, `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`; able to read
            the run's folder); None: the trainer starts one from `vllm_python` and stops it at the end.
        vllm_python: the interpreter of the server's own environment; None:
            `$DETOX_LIGHTNING_VLLM_PYTHON`, else the checkout's `.venv-vllm/bin/python`.
        timeout_s: the longest wait for one reply of the server (then one error, never a hang).
        startup_timeout_s: how long a started server may take to answer its health check.
        importance_sampling: reweight each token's policy-gradient loss by p_trainer / p_vllm,
            truncated (trl's `vllm_importance_sampling_correction`, on by default as there): the
            correction for the tokens vLLM sampled from a slightly different distribution.
        importance_sampling_mode: `truncate` (min(ratio, cap)) or `mask` (0 above the cap); per
            token, or per sequence for a sequence-ratio estimator (rloo).
        importance_sampling_cap: the cap C (trl 1.12's `vllm_importance_sampling_clip_max`, 3.0).
    """

    engine: str = "generate"
    vllm_url: str | None = None
    vllm_python: str | None = None
    timeout_s: float = 300.0
    startup_timeout_s: float = 300.0
    importance_sampling: bool = True
    importance_sampling_mode: ImportanceMode = "truncate"
    importance_sampling_cap: float = 3.0


def rollout_problems(rollout: RolloutSettings, ppo: RLSettings) -> list[str | None]:
    """The rollout settings' problems, one line each naming the flag."""
    r = "model.rollout."
    problems: list[str | None] = []
    if rollout.engine not in ("generate", "vllm"):
        problems.append(f"{r}engine={rollout.engine!r} is not one of generate, vllm")
    if rollout.importance_sampling_mode not in IMPORTANCE_MODES:
        problems.append(f"{r}importance_sampling_mode={rollout.importance_sampling_mode!r} is not one of {', '.join(IMPORTANCE_MODES)}")
    if rollout.vllm_url is not None and not rollout.vllm_url.startswith(("http://", "https://")):
        problems.append(f"{r}vllm_url={rollout.vllm_url!r} must be an http:// or https:// URL")
    if rollout.engine == "vllm" and ppo.logprobs_from_generate:
        problems.append(
            "model.ppo.logprobs_from_generate=True needs the trainer's own generate: with "
            f"{r}engine='vllm' the old log-probs come from a forward pass (leave it null)"
        )
    problems += [
        out_of_range(r + "timeout_s", rollout.timeout_s, 0, low_open=True),
        out_of_range(r + "startup_timeout_s", rollout.startup_timeout_s, 0, low_open=True),
        out_of_range(r + "importance_sampling_cap", rollout.importance_sampling_cap, 1),
    ]
    return problems


@dataclass
class RLSettings:
    """RL hyper-parameters (trl's classic PPO defaults, the notebook's learning rate and batch split).

    Args:
        advantage_estimator: `gae` (PPO with a value head, the default), `rloo` (REINFORCE
            leave-one-out, trl's RLOOTrainer), `grpo` (group-normalised, trl's GRPOTrainer),
            `reinforce_plus_plus` (OpenRLHF's REINFORCE++: KL-shaped per-token rewards, discounted
            returns normalised over the batch, no critic) or `reinforce_plus_plus_baseline` (the
            same on scores minus their group's mean; gamma 1). All but `gae` train no value head;
            rloo, grpo and reinforce_plus_plus_baseline need `samples_per_prompt` >= 2.
        samples_per_prompt: k responses per prompt, sampled in the same batched `generate` (the
            prompts repeated); rloo/grpo compare the k with each other. An iteration then holds
            `data.batch_size * k` responses, and `mini_batch_size` counts responses.
        normalize_advantages: rloo: normalise the advantages over the whole batch (trl's
            `normalize_advantages`, off by default as there). gae and reinforce_plus_plus always
            normalise over the batch's response tokens.
        scale_rewards: grpo: divide each advantage by its group's reward std (`group`, trl's
            default), the batch's (`batch`) or nothing (`none`).
        loss_type: grpo: how token losses are aggregated, as trl's `loss_type`: `dapo` (trl's
            default: the mean over the mini-batch's tokens of every rank), `grpo`, `bnpo`, `dr_grpo`.
        use_bias_correction_kl: grpo: multiply the k3 KL term by the importance ratio to the
            rollout policy (trl's `use_bias_correction_kl`, on by default as there).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay (0 = trl's Adam).
        mini_batch_size: responses per optimizer step; must divide `data.batch_size * samples_per_prompt`.
        ppo_epochs: passes over the batch per iteration.
        gradient_accumulation_steps: micro-batches per mini-batch (must divide mini_batch_size).
        cliprange: policy ratio clip.
        cliprange_value: value prediction clip around the rollout values.
        vf_coef: value loss weight.
        gamma: discount of gae and reinforce_plus_plus (reinforce_plus_plus_baseline needs 1).
        lam: GAE lambda.
        max_grad_norm: clip the gradient norm to this; None: no clipping.
        kl_penalty: per-token KL estimate in the reward: k1 (log-ratio), abs, mse or full (exact,
            over the vocabulary, from the policy and reference logits of each scoring chunk).
        init_kl_coef: initial KL coefficient (trl's `beta` for rloo and grpo: rloo subtracts
            beta * the summed KL from each sequence's score, grpo adds beta * the k3 KL per token
            to the loss). 0 skips the reference pass (any estimator; no controller moves it from 0).
        adap_kl_ctrl: adapt the coefficient towards `target` (else it stays fixed).
        target: target of the adaptive controller, in KL summed over a response.
        horizon: horizon of the adaptive controller.
        score_clip: clip scores to [-score_clip, score_clip] after scaling; None: no clip.
        score_scaling: divide scores by the running std of all scores seen.
        missing_eos_penalty: subtract this from the score of responses that never emit EOS.
        disable_dropout: keep the policy and value head in eval mode during the update, so that
            old and new log-probs agree and at the first iteration the policy equals the reference
            (KL 0, ratio 1). False: dropout on in the update, as the notebook.
        gradient_checkpointing: recompute each transformer block's activations in the update's backward pass
            instead of keeping them (less memory for about one more forward pass per mini-batch).
            Checkpointing runs only in train mode, so with `disable_dropout` every dropout
            probability of the policy is set to 0 and the update runs in train mode.
        logprobs_from_generate: take rollout log-probs and values from `generate`'s own logits and
            hidden states instead of a second forward pass. None (default): only where that is
            exact, i.e. float32 base weights. In bfloat16 the cached incremental decode rounds
            differently from the teacher-forced forward that gives the reference's and the
            update's log-probs, so the first step's KL would not be 0: None takes the forward pass
            there (the README's precision section has the figures). True costs memory:
            generation's (B, T, V) step logits live until the rollout is scored.
        max_consecutive_skips: an iteration whose rewards, advantages, loss or updated weights are
            NaN/inf is skipped (no update kept; counted in `ppo/skipped_iterations`); the run stops
            with an error when this many iterations in a row were skipped.
    """

    advantage_estimator: str = "gae"
    samples_per_prompt: int = 1
    normalize_advantages: bool = False
    scale_rewards: ScaleRewards = "group"
    loss_type: GRPOLossType = "dapo"
    use_bias_correction_kl: bool = True
    learning_rate: float = 1.41e-5
    weight_decay: float = 0.0
    mini_batch_size: int = 4
    ppo_epochs: int = 1
    gradient_accumulation_steps: int = 1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float | None = 1.0
    kl_penalty: KLPenalty = "k1"
    init_kl_coef: float = 0.2
    adap_kl_ctrl: bool = True
    target: float = 6.0
    horizon: int = 10000
    score_clip: float | None = None
    score_scaling: bool = False
    missing_eos_penalty: float | None = None
    disable_dropout: bool = True
    gradient_checkpointing: bool = False
    logprobs_from_generate: bool | None = None
    max_consecutive_skips: int = 3

    def __post_init__(self) -> None:
        if self.max_consecutive_skips < 1:
            raise ConfigError(f"model.ppo.max_consecutive_skips={self.max_consecutive_skips} must be at least 1")


def check_settings(
    batch_size: int, ppo: RLSettings, generation: GenerationSettings, rollout: RolloutSettings | None = None
) -> None:
    """Raise one ConfigError naming every inconsistent or out-of-range setting."""
    problems = rollout_problems(rollout, ppo) if rollout is not None else []
    k = ppo.samples_per_prompt
    choices = {
        "scale_rewards": (ppo.scale_rewards, SCALE_REWARDS),
        "loss_type": (ppo.loss_type, GRPO_LOSS_TYPES),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            problems.append(f"model.ppo.{name}={value!r} is not one of {', '.join(allowed)}")
    problems += estimator_problems(ppo)  # an unknown name, or the estimator's own settings
    samples_problem = samples_per_prompt_problem(ppo)
    if samples_problem:
        problems.append(samples_problem)
    elif ppo.mini_batch_size < 1 or (batch_size * k) % ppo.mini_batch_size:
        rows = f"data.batch_size={batch_size}" + (f" x model.ppo.samples_per_prompt={k} = {batch_size * k} responses" if k > 1 else "")
        problems.append(f"{rows} is not divisible by model.ppo.mini_batch_size={ppo.mini_batch_size}")
    elif ppo.gradient_accumulation_steps < 1 or ppo.mini_batch_size % ppo.gradient_accumulation_steps:
        problems.append(
            f"model.ppo.mini_batch_size={ppo.mini_batch_size} is not divisible by "
            f"model.ppo.gradient_accumulation_steps={ppo.gradient_accumulation_steps}"
        )
    if ppo.learning_rate <= 0:
        problems.append(f"model.ppo.learning_rate={ppo.learning_rate} must be positive")
    if ppo.kl_penalty not in KL_PENALTIES:
        problems.append(f"model.ppo.kl_penalty={ppo.kl_penalty!r} is not one of {', '.join(KL_PENALTIES)}")
    p, g = "model.ppo.", "model.generation."
    problems += [
        out_of_range(p + "ppo_epochs", ppo.ppo_epochs, 1),
        out_of_range(p + "weight_decay", ppo.weight_decay, 0),
        out_of_range(p + "cliprange", ppo.cliprange, 0, low_open=True),
        out_of_range(p + "cliprange_value", ppo.cliprange_value, 0, low_open=True),
        out_of_range(p + "vf_coef", ppo.vf_coef, 0),
        out_of_range(p + "gamma", ppo.gamma, 0, 1),
        out_of_range(p + "lam", ppo.lam, 0, 1),
        out_of_range(p + "max_grad_norm", ppo.max_grad_norm, 0, low_open=True),
        out_of_range(p + "init_kl_coef", ppo.init_kl_coef, 0),
        out_of_range(p + "target", ppo.target, 0, low_open=True),
        out_of_range(p + "horizon", ppo.horizon, 1),
        out_of_range(p + "score_clip", ppo.score_clip, 0, low_open=True),
        out_of_range(p + "missing_eos_penalty", ppo.missing_eos_penalty, 0),
        out_of_range(g + "min_length", generation.min_length, 0),
        out_of_range(g + "top_k", generation.top_k, 0),
        out_of_range(g + "top_p", generation.top_p, 0, 1, low_open=True),
    ]
    if not 1 <= generation.output_min_length <= generation.output_max_length:
        problems.append(
            f"model.generation.output_min_length={generation.output_min_length} and output_max_length="
            f"{generation.output_max_length} must satisfy 1 <= min <= max"
        )
    if generation.temperature <= 0:
        problems.append(f"model.generation.temperature={generation.temperature} must be positive")
    if generation.top_k > 0 or 0 < generation.top_p < 1:
        # Log-probs are those of the full distribution (divided by the temperature); tokens drawn
        # from a top-k/top-p truncated one would make every update silently off-policy.
        problems.append(
            f"model.generation.top_k={generation.top_k}, top_p={generation.top_p}: PPO scores each sampled "
            f"token under the full distribution, so it must also sample from it (top_k 0, top_p 1.0); "
            f"use temperature to sharpen sampling instead"
        )
    raise_problems(problems)


PPOSettings = RLSettings  # the name before RLOO, GRPO and REINFORCE++ joined PPO; old configs still run
