"""RLOO and GRPO advantages and losses against trl 1.12's installed code and naive float64 loops.

The losses are computed by calling trl's own `RLOOTrainer._compute_loss` / `GRPOTrainer._compute_loss`
on a stub trainer whose forward returns our tensors. The advantages live in the middle of trl's
2,000-line generation methods, so they are transcribed here, and each transcribed line is checked to
appear verbatim in the installed source (a trl change to that math fails this file).
"""

import dataclasses
import inspect
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.rloo_trainer import RLOOTrainer
from trl.trainer.utils import nanstd

from detox_lightning.rl import estimators, kl, losses

# ---- trl's advantage lines, transcribed (and checked against the installed source below) ----

RLOO_LINES = [
    "grouped_rewards = rewards.view(-1, num_generations)",
    "scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)",
    "grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)",
    "baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)",
    "baselines = baselines.view(-1)",
    "advantages = rewards - baselines",
    "advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)",
]
GRPO_LINES = [
    "mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)",
    "mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)",
    "std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)",
    "std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)",
    "std_rewards = nanstd(rewards).expand_as(rewards)",
    "advantages = rewards - mean_grouped_rewards",
    "advantages = advantages / (std_rewards + 1e-4)",
]


def trl_rloo_advantages(rewards, num_generations, normalize_advantages):
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    baselines = baselines.view(-1)
    advantages = rewards - baselines
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return advantages


def trl_grpo_advantages(rewards, num_generations, scale_rewards):
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


@pytest.mark.parametrize("trainer,lines", [(RLOOTrainer, RLOO_LINES), (GRPOTrainer, GRPO_LINES)])
def test_transcribed_advantage_lines_are_trls_own(trainer, lines):
    source = " ".join(inspect.getsource(trainer._generate_and_score_completions).split())
    for line in lines:
        assert line in source, line


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_equal_trl(k, normalize):
    rewards = torch.randn(8 * k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    got = estimators.rloo_advantages(rewards, k, normalize)
    torch.testing.assert_close(got, trl_rloo_advantages(rewards, k, normalize), rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_equal_trl(k, scale):
    rewards = torch.randn(8 * k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    got = estimators.grpo_advantages(rewards, k, scale)
    torch.testing.assert_close(got, trl_grpo_advantages(rewards, k, scale), rtol=0, atol=1e-6)


def test_rloo_advantages_equal_a_naive_leave_one_out_loop():
    k = 3
    rewards = torch.randn(4 * k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    naive = torch.empty_like(rewards)
    for i in range(len(rewards)):
        group = range(i // k * k, i // k * k + k)
        naive[i] = rewards[i] - sum(rewards[j] for j in group if j != i) / (k - 1)
    torch.testing.assert_close(estimators.rloo_advantages(rewards, k), naive)


def _rank_advantages(rank, init_file, rewards, k, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)

    def all_reduce_sum(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    mine = rewards.view(2, -1)[rank]  # each rank holds whole groups: half the prompts
    out[f"rloo{rank}"] = estimators.rloo_advantages(mine, k, normalize=True, all_reduce_sum=all_reduce_sum)
    out[f"grpo{rank}"] = estimators.grpo_advantages(mine, k, "batch", all_reduce_sum=all_reduce_sum)
    dist.destroy_process_group()


def test_batch_wide_statistics_over_two_ranks_equal_one_device(tmp_path):
    import torch.multiprocessing as mp

    k, rewards = 2, torch.randn(16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_advantages, args=(str(tmp_path / "init"), rewards, k, out), nprocs=2)
        out = dict(out)
    whole_rloo = estimators.rloo_advantages(rewards, k, normalize=True)
    whole_grpo = estimators.grpo_advantages(rewards, k, "batch")
    torch.testing.assert_close(torch.cat([out["rloo0"], out["rloo1"]]), whole_rloo)
    torch.testing.assert_close(torch.cat([out["grpo0"], out["grpo1"]]), whole_grpo)
    # and the normalisation is not a per-rank one
    assert not torch.allclose(out["rloo0"], estimators.rloo_advantages(rewards.view(2, -1)[0], k, normalize=True))


# ---- losses: trl's own _compute_loss on a stub trainer ----


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


def loss_inputs(seed=0, b=6, t=7):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logprobs + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3  # ratios beyond the clip
    ref = logprobs + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.2
    lengths = torch.tensor([t, 1, 3, t - 1, 5, 2])[:b]
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.float64)
    advantages = torch.randn(b, generator=g, dtype=torch.float64)
    return logprobs, old, ref, mask, advantages


def stub_trainer(per_token_logps, **attrs):
    stub = SimpleNamespace(
        accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        model=SimpleNamespace(training=True),
        aux_loss_enabled=False,
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None),
        **attrs,
    )
    return stub


def model_inputs(mask):
    b, t = mask.shape
    return {
        "prompt_ids": torch.ones(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.ones(b, t, dtype=torch.long),
        "completion_mask": mask,
    }


def test_rloo_loss_equals_trls_compute_loss():
    logprobs, old, _, mask, advantages = loss_inputs()
    eps = 0.2
    stub = stub_trainer(logprobs, epsilon_low=eps, epsilon_high=eps)
    inputs = model_inputs(mask) | {"old_logps": (old * mask).sum(1), "advantages": advantages}
    want = RLOOTrainer._compute_loss(stub, None, inputs)
    got, clipfrac, _ = losses.rloo_loss(logprobs, old, advantages, mask, eps)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert clipfrac == pytest.approx(stub._metrics["train"]["clip_ratio/region_mean"][0])
    assert 0 < clipfrac < 1  # the inputs exercise the clip


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_grpo_loss_and_gradient_equal_trls_compute_loss(loss_type, beta, bias_correction):
    logprobs, old, ref, mask, advantages = loss_inputs(seed=1)
    theirs, ours = logprobs.clone().requires_grad_(), logprobs.clone().requires_grad_()
    eps, max_len = 0.2, mask.shape[1] + 3
    args = SimpleNamespace(use_bias_correction_kl=bias_correction, delta=None, steps_per_generation=1)
    stub = stub_trainer(
        theirs, epsilon_low=eps, epsilon_high=eps, beta=beta, loss_type=loss_type, args=args,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        use_vllm=False, vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
        max_completion_length=max_len, _entropy_bonus_enabled=False,
    )
    inputs = model_inputs(mask) | {
        "old_per_token_logps": old, "ref_per_token_logps": ref, "advantages": advantages,
        "num_items_in_batch": mask.sum(),
    }
    want = GRPOTrainer._compute_loss(stub, None, inputs)
    got, clipfrac, kl = losses.grpo_loss(
        ours, old, advantages, mask, eps, beta=beta, ref_logprobs=ref, loss_type=loss_type,
        max_completion_length=max_len, num_items=float(mask.sum()), use_bias_correction_kl=bias_correction,
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    want.backward()
    got.backward()
    assert theirs.grad.abs().sum() > 0
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-6)
    assert clipfrac == pytest.approx(stub._metrics["train"]["clip_ratio/region_mean"][0])
    if beta:
        assert kl == pytest.approx(stub._metrics["train"]["kl"][0])


def test_bias_correction_changes_the_gradient_but_not_the_loss_at_ratio_one():
    """At the first step (policy = rollout policy) coef_1 is 1: the same loss, another gradient (trl's default)."""
    logprobs, _, ref, mask, advantages = loss_inputs(seed=2)
    grads = []
    for bias_correction in (False, True):
        leaf = logprobs.clone().requires_grad_()
        loss, _, _ = losses.grpo_loss(leaf, logprobs, advantages, mask, 0.2, beta=0.5, ref_logprobs=ref,
                                      use_bias_correction_kl=bias_correction)
        loss.backward()
        grads.append((loss.detach(), leaf.grad))
    (loss_off, grad_off), (loss_on, grad_on) = grads
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=1e-12)
    assert not torch.allclose(grad_on, grad_off)


def test_grpo_bias_correction_is_on_by_default_as_in_trl():
    from trl import GRPOConfig

    from detox_lightning import RLSettings

    default = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}["use_bias_correction_kl"]
    assert RLSettings().use_bias_correction_kl is default is True


def test_k3_kl_equals_a_naive_loop_and_is_zero_only_at_equality():
    a = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    b = torch.tensor([-1.0, -1.0, -3.0], dtype=torch.float64)
    naive = torch.tensor([float(torch.exp(y - x) - (y - x) - 1) for x, y in zip(a, b, strict=True)], dtype=torch.float64)
    torch.testing.assert_close(kl.k3_kl(a, b), naive)
    assert kl.k3_kl(a, b)[0] == 0 and (kl.k3_kl(a, b)[1:] > 0).all()
