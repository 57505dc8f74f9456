"""REINFORCE++ and REINFORCE++-baseline against OpenRLHF's definition, and through the real CLI.

The float64 loops below are written from OpenRLHF's source (github.com/OpenRLHF/OpenRLHF):
`compute_reward` (openrlhf/models/utils.py), `get_cumulative_returns` and the normalisation at
the end of `compute_advantages_and_returns` (openrlhf/trainer/ppo_utils/experience_maker.py:
estimators `reinforce` and `reinforce_baseline`), and `PolicyLoss` with its token-level
`aggregate_loss` (openrlhf/models/loss.py).
"""

import threading
from pathlib import Path

import pytest
import torch
from helpers import fit_tiny_without_evaluation
from test_ppo_math import ThreadAllReduce

from detox_lightning import RLSettings
from detox_lightning.rl.estimators import ESTIMATORS, Rollout, build_estimator, reinforce_plus_plus_advantages
from detox_lightning.rl.experience import Experience

ROOT = Path(__file__).resolve().parents[1]


def openrlhf_advantages(scores, kl, mask, kl_coef, gamma, k, baseline):
    """OpenRLHF, one response and one token at a time, in float64."""
    scores, kl, mask = scores.double(), kl.double(), mask.double()
    b, t = mask.shape
    if baseline:  # rewards - rewards.mean(-1, keepdim=True) over each prompt's k samples
        scores = torch.stack([scores[i] - sum(scores[i // k * k + j] for j in range(k)) / k for i in range(b)])
    returns = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        reward = [-kl_coef * float(kl[i, j]) for j in range(t)]  # compute_reward: kl_reward = -kl_coef * kl
        for j in reversed(range(t)):  # ... plus r on the last action_mask position
            if mask[i, j] > 0.5:
                reward[j] += float(scores[i])
                break
        cumulative = 0.0
        for j in reversed(range(t)):  # get_cumulative_returns: rewards masked, discounted from the end
            cumulative = reward[j] * float(mask[i, j]) + gamma * cumulative
            returns[i, j] = cumulative
    n = mask.sum()
    mean = (returns * mask).sum() / n
    var = ((returns - mean) ** 2 * mask).sum() / n
    return (returns - mean) * var.clamp(min=1e-8).rsqrt() * mask, returns


def inputs(k, prompts=3, t=9, seed=0):
    g = torch.Generator().manual_seed(seed + k)
    b = k * prompts
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0], lengths[1] = 1, t  # a one-token response and a full one
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    scores = torch.randn(b, generator=g) * 2
    kl = torch.randn(b, t, generator=g) * 0.2 * mask
    return scores, kl, mask


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize(("name", "gamma"), [("reinforce_plus_plus", 1.0), ("reinforce_plus_plus", 0.9),
                                             ("reinforce_plus_plus_baseline", 1.0)])  # OpenRLHF: baseline at gamma 1
def test_advantages_equal_openrlhfs_definition_in_a_float64_loop(k, gamma, name):
    baseline = name.endswith("baseline")
    scores, kl, mask = inputs(k)
    estimator = build_estimator(RLSettings(advantage_estimator=name, samples_per_prompt=k, gamma=gamma))
    advantages, returns = estimator.advantages(Rollout(scores=scores, mask=mask, kl=kl, kl_coef=0.05))
    want_adv, want_ret = openrlhf_advantages(scores, kl, mask, 0.05, gamma, k, baseline)
    assert advantages.dtype == torch.float32 and advantages.shape == mask.shape
    torch.testing.assert_close(advantages.double(), want_adv, rtol=0, atol=1e-6)
    torch.testing.assert_close(returns.double(), want_ret, rtol=0, atol=1e-6)
    # in float64 throughout, far tighter
    got64, _ = estimator.advantages(Rollout(scores=scores.double(), mask=mask.double(), kl=kl.double(), kl_coef=0.05))
    torch.testing.assert_close(got64, want_adv, rtol=0, atol=1e-12)


def test_the_baseline_variant_subtracts_the_group_mean_and_does_not_divide_by_its_std():
    k, (scores, kl, mask) = 2, inputs(2)
    settings = RLSettings(advantage_estimator="reinforce_plus_plus_baseline", samples_per_prompt=k)
    got, _ = build_estimator(settings).advantages(Rollout(scores=scores, mask=mask, kl=kl, kl_coef=0.05))
    shifted = scores + torch.arange(len(scores)).div(k, rounding_mode="floor") * 7.0  # a constant per group
    again, _ = build_estimator(settings).advantages(Rollout(scores=shifted, mask=mask, kl=kl, kl_coef=0.05))
    torch.testing.assert_close(again, got, rtol=0, atol=1e-5)  # the group mean takes it out
    grouped = scores.view(-1, k)
    scaled = (grouped * torch.tensor([[1.0], [3.0], [0.5]])).reshape(-1)  # another spread per group
    other, _ = build_estimator(settings).advantages(Rollout(scores=scaled, mask=mask, kl=kl, kl_coef=0.05))
    assert not torch.allclose(other, got, atol=1e-3)  # a per-group std would have taken that out


def test_normalisation_spans_every_ranks_response_tokens():
    """Two ranks of unequal token counts, each normalising its own rows with a summing all-reduce."""
    scores, kl, mask = inputs(2, prompts=4)
    whole, _ = reinforce_plus_plus_advantages(scores, kl, mask, 0.05, 1.0)
    shards, reduce, out = [slice(0, 2), slice(2, 8)], ThreadAllReduce(2), {}

    def rank(i):
        out[i], _ = reinforce_plus_plus_advantages(scores[shards[i]], kl[shards[i]], mask[shards[i]], 0.05, 1.0, reduce)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    torch.testing.assert_close(torch.cat([out[0], out[1]]), whole, rtol=0, atol=1e-6)
    alone, _ = reinforce_plus_plus_advantages(scores[:2], kl[:2], mask[:2], 0.05, 1.0)
    assert not torch.allclose(alone, out[0], atol=1e-3)  # per-rank normalisation would differ


def openrlhf_policy_loss(log_probs, old_log_probs, advantages, mask, eps, batch_num_tokens):
    """openrlhf.models.loss.PolicyLoss (ppo, no dual clip) with token-level aggregate_loss, dp_size 1."""
    ratio = (log_probs - old_log_probs).clamp(min=-20.0, max=20.0).exp()
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - eps, 1 + eps) * advantages
    loss = -torch.min(surr1, surr2)
    return (loss * mask).sum() / batch_num_tokens, ((surr2 < surr1).float() * mask).sum() / mask.sum()


@pytest.mark.parametrize("name", ["reinforce_plus_plus", "reinforce_plus_plus_baseline"])
def test_loss_and_gradient_equal_openrlhfs_token_level_policy_loss(name):
    scores, kl, mask = inputs(2, seed=3)
    estimator = build_estimator(RLSettings(advantage_estimator=name, samples_per_prompt=2))
    advantages, returns = estimator.advantages(Rollout(scores=scores, mask=mask, kl=kl, kl_coef=0.05))
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(mask.shape, generator=g)
    b, t = mask.shape
    exp = Experience(input_ids=torch.ones(b, 2, dtype=torch.long), attention_mask=torch.ones(b, 2, dtype=torch.long),
                     response_ids=torch.ones(b, t, dtype=torch.long), mask=mask, logprobs=old, advantages=advantages,
                     returns=returns)
    rows = torch.tensor([0, 3, 4])
    mb = exp.select(rows)
    now = (mb.logprobs + torch.randn(mb.logprobs.shape, generator=g) * 0.3).requires_grad_()
    theirs_in = now.detach().clone().requires_grad_()
    step_tokens = float(mask.sum())  # the micro-batch is one of several in its optimizer step
    loss, stats = estimator.loss(mb, now, None, kl_coef=0.05, num_items=step_tokens)
    want, clipfrac = openrlhf_policy_loss(theirs_in, mb.logprobs, mb.advantages, mb.mask, 0.2, step_tokens)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-6)
    assert 0 < float(stats["ppo/policy/clipfrac"]) < 1
    torch.testing.assert_close(stats["ppo/policy/clipfrac"], clipfrac)
    loss.backward()
    want.backward()
    torch.testing.assert_close(now.grad, theirs_in.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["reinforce_plus_plus", "reinforce_plus_plus_baseline"])
def test_registered_without_a_value_head(name):
    assert ESTIMATORS[name].needs_value_head is False
    assert build_estimator(RLSettings(advantage_estimator=name, samples_per_prompt=2)).needs_reference


# ---- through the real CLI ----

SAMPLES = ["--model.init_args.ppo.samples_per_prompt", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["reinforce_plus_plus", "reinforce_plus_plus_baseline"])
def test_cli_trains_three_iterations_from_kl_zero_without_a_value_head(tmp_path, perturbed_adapter, name):
    logged = fit_tiny_without_evaluation(
        tmp_path, 3, "--model.init_args.ppo.advantage_estimator", name, *SAMPLES,
        "--model.init_args.policy.adapter_name_or_path", perturbed_adapter,
    )
    assert len(logged["objective/kl"]) == 3 and len(logged["ppo/loss/total"]) == 3
    assert abs(logged["objective/kl"][0]) < 1e-4
    assert abs(logged["ppo/policy/ratio_first"][0] - 1) < 1e-3
    assert "ppo/returns/mean" in logged and "ppo/loss/value" not in logged and "ppo/val/mean" not in logged
    assert all(torch.isfinite(torch.tensor(v)).all() for v in logged.values())
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints
    for path in checkpoints:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert state and not any("v_head" in key for key in state), path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["reinforce_plus_plus", "reinforce_plus_plus_baseline"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, name):
    from test_checkpointing import killed_and_resumed_vs_straight

    got = killed_and_resumed_vs_straight(tmp_path, "--model.init_args.ppo.advantage_estimator", name, *SAMPLES)
    assert not any("v_head" in key for key in got["state_dict"])
