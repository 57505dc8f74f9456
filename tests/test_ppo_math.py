"""The RL math shared by the estimators (masks, KL, GAE, whitening, losses, controllers) against
hand-computed values and naive float64 loops."""

import math
import threading

import pytest
import torch

from detox_lightning.rl import stats
from detox_lightning.rl.controllers import AdaptiveKLController, FixedKLController
from detox_lightning.rl.estimators.gae import gae
from detox_lightning.rl.kl import full_kl, per_token_kl, shape_rewards
from detox_lightning.rl.losses import policy_loss, value_loss
from detox_lightning.rl.masks import response_mask
from detox_lightning.rl.stats import RunningMoments
from detox_lightning.trl_compat import masked_whiten


def naive_gae(values, rewards, mask, gamma, lam):
    """The textbook backwards loop, one row and one token at a time."""
    advantages = torch.zeros_like(values)
    for b in range(values.shape[0]):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            advantages[b, t] = last
    returns = (advantages + values) * mask
    return advantages, returns


def test_response_mask_covers_first_token_to_eos_and_not_padding():
    eos, pad = 1, 0
    response_ids = torch.tensor(
        [
            [5, pad, eos, pad, pad],  # a sampled pad id mid-response is still a response token
            [eos, pad, pad, pad, pad],  # EOS as the very first token
            [4, 4, 4, 4, 4],  # no EOS: every generated token
            [7, eos, eos, pad, pad],  # only the first EOS counts
        ]
    )
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0],
            [1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(response_mask(response_ids, eos), expected)


def test_gae_three_tokens_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 99.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(values, rewards, mask, gamma=1.0, lam=0.95)
    # row 0: deltas (1, 1, -2) -> A2 = -2, A1 = 1 - 0.95 * 2 = -0.9, A0 = 1 - 0.95 * 0.9 = 0.145
    # row 1: third token masked; deltas (1.5, -1) -> A1 = -1, A0 = 1.5 - 0.95 = 0.55
    torch.testing.assert_close(advantages, torch.tensor([[0.145, -0.9, -2.0], [0.55, -1.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.145, 1.1, 1.0], [1.55, 1.0, 0.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 0.0), (0.5, 1.0)])
def test_gae_matches_naive_loop_in_float64(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 17
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([1, 5, 17, 9, 16, 2])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    advantages, returns = gae(values, rewards, mask, gamma, lam)
    expected_adv, expected_ret = naive_gae(values * mask, rewards * mask, mask, gamma, lam)
    torch.testing.assert_close(advantages, expected_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(returns, expected_ret, rtol=1e-12, atol=1e-12)


def test_masked_whiten_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # masked mean 2, unbiased masked variance 1
    whitened = masked_whiten(values, mask)
    torch.testing.assert_close(whitened[mask.bool()], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)


class ThreadAllReduce:
    """Sum over `world` threads, one per simulated rank: each call blocks until all have called."""

    def __init__(self, world: int) -> None:
        self.barrier, self.lock, self.parts = threading.Barrier(world), threading.Lock(), []

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.parts.append(tensor.clone())
        self.barrier.wait()
        total = torch.stack(self.parts).sum(dim=0)
        if self.barrier.wait() == 0:  # everyone has read; one thread clears for the next call
            self.parts.clear()
        self.barrier.wait()
        return total


def test_global_masked_whiten_equals_trl_on_the_concatenated_batch():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 7, generator=g, dtype=torch.float64) * 3 + 1
    lengths = torch.tensor([7, 1, 4, 2, 6, 3])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).double()
    expected = masked_whiten(values, mask)
    torch.testing.assert_close(stats.masked_whiten(values, mask), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        stats.masked_whiten(values, mask, shift_mean=False), masked_whiten(values, mask, shift_mean=False)
    )

    # three ranks of unequal token counts, each whitening its own rows with a summing all-reduce
    shards = [slice(0, 1), slice(1, 4), slice(4, 6)]
    reduce, out = ThreadAllReduce(len(shards)), {}

    def rank(i: int) -> None:
        out[i] = stats.masked_whiten(values[shards[i]], mask[shards[i]], all_reduce=reduce)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    got = torch.cat([out[i] for i in range(len(shards))])
    torch.testing.assert_close(got * mask, expected * mask, rtol=1e-12, atol=1e-12)
    # per-rank whitening would differ: the point of the global statistics
    assert not torch.allclose(masked_whiten(values[shards[1]], mask[shards[1]]) * mask[shards[1]], got[shards[1]] * mask[shards[1]])


def test_shape_rewards_puts_score_on_last_response_token():
    scores = torch.tensor([2.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    rewards = shape_rewards(scores, kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 1.85], [2.75, 0.0, 0.0]]))


def test_per_token_kl_variants():
    logprobs = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(per_token_kl(logprobs, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    torch.testing.assert_close(per_token_kl(logprobs, ref, "abs"), torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(per_token_kl(logprobs, ref, "mse"), torch.tensor([[0.125, 0.5]]))
    with pytest.raises(ValueError, match="full"):
        per_token_kl(logprobs, ref, "full")


def test_full_kl_matches_definition():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    expected = torch.zeros(2, 3, dtype=torch.float64)
    for b in range(2):
        for t in range(3):
            p = torch.softmax(logits[b, t], -1)
            q = torch.softmax(ref_logits[b, t], -1)
            expected[b, t] = sum(p[i] * math.log(p[i] / q[i]) for i in range(7))
    torch.testing.assert_close(full_kl(logits, ref_logits).double(), expected, rtol=1e-5, atol=1e-6)
    assert full_kl(logits, logits).abs().max() < 1e-6


def test_policy_loss_clipping_by_hand():
    old = torch.zeros(1, 3)
    new = torch.tensor([[math.log(1.5), math.log(1.5), 0.0]])
    advantages = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding and must not count
    loss, clipfrac, approxkl = policy_loss(new, old, advantages, mask, cliprange=0.2)
    # A=+1, r=1.5: max(-1.5, -1.2) = -1.2 (clipped); A=-1, r=1.5: max(1.5, 1.2) = 1.5 (not clipped)
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 1.5) / 2))
    torch.testing.assert_close(clipfrac, torch.tensor(0.5))
    torch.testing.assert_close(approxkl, torch.tensor(0.5 * math.log(1.5) ** 2))


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    logprobs = torch.tensor([[-0.3, -2.0]])
    advantages = torch.tensor([[0.7, -0.1]])
    loss, clipfrac, approxkl = policy_loss(logprobs, logprobs.clone(), advantages, torch.ones(1, 2), 0.2)
    torch.testing.assert_close(loss, torch.tensor(-0.3))
    assert clipfrac == 0 and approxkl == 0


def test_value_loss_clipping_by_hand():
    old_values = torch.tensor([[0.0, 0.0]])
    vpred = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[2.0, 0.0]])
    loss, clipfrac = value_loss(vpred, old_values, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 1: both 0.01
    torch.testing.assert_close(loss, torch.tensor(0.5 * (3.24 + 0.01) / 2))
    torch.testing.assert_close(clipfrac, torch.tensor(0.5))


def test_adaptive_kl_controller_update_by_hand():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=16)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 16 / 10000))
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(6.0, n_steps=16)
    assert ctl.value == pytest.approx(0.2)
    ctl.update(5.7, n_steps=16)  # error -0.05, inside the clip
    assert ctl.value == pytest.approx(0.2 * (1 - 0.05 * 16 / 10000))
    restored = AdaptiveKLController(1.0, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.3)
    ctl.update(100.0, n_steps=16)
    assert ctl.value == 0.3


def test_running_moments_equal_moments_of_everything_seen():
    g = torch.Generator().manual_seed(2)
    chunks = [torch.randn(n, generator=g) * 3 + 1 for n in (5, 16, 1, 9)]
    moments = RunningMoments()
    for chunk in chunks:
        moments.update(chunk)
    everything = torch.cat(chunks).double()
    assert moments.count == everything.numel()
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.std == pytest.approx(everything.std(unbiased=False).item())
