"""The estimator interface: one registry, one shape contract, and no estimator chosen by string
outside `detox_lightning/rl/estimators/`."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from detox_lightning import RLSettings
from detox_lightning.errors import ConfigError
from detox_lightning.rl import kl, losses, stats
from detox_lightning.rl.estimators import (
    ESTIMATORS,
    Rollout,
    build_estimator,
    estimator_problems,
    grpo_advantages,
    per_sequence,
    rloo_advantages,
)
from detox_lightning.rl.estimators.gae import gae
from detox_lightning.rl.experience import Experience
from detox_lightning.training.settings import GenerationSettings, check_settings

PACKAGE = Path(__file__).resolve().parents[1] / "detox_lightning"
ESTIMATOR_DIR = PACKAGE / "rl" / "estimators"
# `advantage_estimator` (or any `estimator`) compared with a string literal, either way round
STRING_COMPARISON = re.compile(
    r"estimator\w*\s*(?:==|!=|\bin\b|\bnot in\b)\s*[\"'(\[{]"
    r"|[\"']\s*(?:==|!=)\s*[\w.]*estimator\b"
)


def test_no_module_outside_the_registry_compares_the_estimator_to_a_string():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ESTIMATOR_DIR in path.parents:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if STRING_COMPARISON.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_pattern_catches_what_it_must():
    for line in ('if ppo.advantage_estimator == "gae":', "x = s.advantage_estimator in ('rloo', 'grpo')",
                 'if "grpo" == self.ppo.advantage_estimator:', 'args.estimator != "gae"'):
        assert STRING_COMPARISON.search(line), line
    assert not STRING_COMPARISON.search("cls = ESTIMATORS[settings.advantage_estimator]")


def test_registry_names_are_the_classes_names():
    assert list(ESTIMATORS) == ["gae", "rloo", "grpo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"]
    for name, cls in ESTIMATORS.items():
        assert cls.name == name
        assert type(build_estimator(RLSettings(advantage_estimator=name))) is cls


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_value_head_and_reference_needs(name):
    estimator = build_estimator(RLSettings(advantage_estimator=name))
    assert estimator.needs_value_head is (name == "gae")
    assert estimator.needs_reference
    fixed_zero = build_estimator(RLSettings(advantage_estimator=name, init_kl_coef=0.0, adap_kl_ctrl=False))
    assert not fixed_zero.needs_reference  # no KL enters training: no estimator needs the reference
    adaptive_zero = build_estimator(RLSettings(advantage_estimator=name, init_kl_coef=0.0))
    assert not adaptive_zero.needs_reference  # the adaptive controller multiplies 0: it stays 0


def rollout_inputs(k=2, prompts=3, t=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    b = k * prompts
    lengths = torch.tensor([t, 1, 3, t - 1, 5, 2, 4, t][:b] + [2] * max(0, b - 8))
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(dtype)
    scores = torch.randn(b, generator=g, dtype=dtype)
    token_kl = torch.randn(b, t, generator=g, dtype=dtype) * 0.1 * mask
    values = torch.randn(b, t, generator=g, dtype=dtype) * mask
    return Rollout(scores=scores, mask=mask, kl=token_kl, values=values, kl_coef=0.3)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_advantages_are_per_token_and_zero_on_padding(name):
    rollout = rollout_inputs()
    advantages, returns = build_estimator(RLSettings(advantage_estimator=name, samples_per_prompt=2)).advantages(rollout)
    assert advantages.shape == rollout.mask.shape
    assert (advantages[rollout.mask == 0] == 0).all() and (advantages[rollout.mask == 1] != 0).any()
    if returns is not None:
        assert returns.shape == rollout.mask.shape and (returns[rollout.mask == 0] == 0).all()


def test_gae_estimator_equals_the_pure_functions():
    rollout = rollout_inputs()
    settings = RLSettings(gamma=0.99, lam=0.9)
    advantages, returns = build_estimator(settings).advantages(rollout)
    rewards = kl.shape_rewards(rollout.scores, rollout.kl, rollout.mask, rollout.kl_coef)
    want_adv, want_ret = gae(rollout.values, rewards, rollout.mask, 0.99, 0.9)
    torch.testing.assert_close(advantages, stats.masked_whiten(want_adv, rollout.mask) * rollout.mask, rtol=0, atol=0)
    torch.testing.assert_close(returns, want_ret, rtol=0, atol=0)


def experience(rollout, advantages, old, ref):
    b, t = rollout.mask.shape
    return Experience(input_ids=torch.ones(b, 2, dtype=torch.long), attention_mask=torch.ones(b, 2, dtype=torch.long),
                      response_ids=torch.ones(b, t, dtype=torch.long), mask=rollout.mask, logprobs=old,
                      advantages=advantages, ref_logprobs=ref)


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_sequence_estimators_broadcast_and_read_back_their_advantage_exactly(name):
    k, rollout = 2, rollout_inputs()
    settings = RLSettings(advantage_estimator=name, samples_per_prompt=k, normalize_advantages=True)
    estimator = build_estimator(settings, max_completion_length=9)
    advantages, returns = estimator.advantages(rollout)
    assert returns is None
    if name == "rloo":
        sequence = rloo_advantages(rollout.scores - 0.3 * (rollout.kl * rollout.mask).sum(dim=1), k, normalize=True)
    else:
        sequence = grpo_advantages(rollout.scores, k, "group")
    assert torch.equal(per_sequence(advantages), sequence)
    assert torch.equal(advantages, sequence[:, None] * rollout.mask)

    g = torch.Generator().manual_seed(5)
    old = -torch.rand(rollout.mask.shape, generator=g, dtype=torch.float64)
    now = old + torch.randn(old.shape, generator=g, dtype=torch.float64) * 0.3
    ref = old + torch.randn(old.shape, generator=g, dtype=torch.float64) * 0.2
    exp = experience(rollout, advantages, old, ref)
    for rows in (torch.arange(len(old)), torch.tensor([1, 2, 5])):  # also a trimmed micro-batch
        mb = exp.select(rows)
        got, mb_stats = estimator.loss(mb, now[rows, : mb.mask.shape[1]], None, kl_coef=0.04,
                                       num_items=float(mb.mask.sum()))
        if name == "rloo":
            want, *_ = losses.rloo_loss(now[rows, : mb.mask.shape[1]], mb.logprobs, sequence[rows], mb.mask, 0.2)
        else:
            want, *_ = losses.grpo_loss(now[rows, : mb.mask.shape[1]], mb.logprobs, sequence[rows], mb.mask, 0.2,
                                        beta=0.04, ref_logprobs=mb.ref_logprobs, num_items=float(mb.mask.sum()),
                                        use_bias_correction_kl=True)
        assert torch.equal(got, want) and torch.equal(mb_stats["ppo/loss/total"], want)


@pytest.mark.parametrize(("name", "normaliser"), [("gae", "mini_batch"), ("rloo", "sequences"), ("grpo", "step"),
                                                   ("reinforce_plus_plus", "step"), ("reinforce_plus_plus_baseline", "step")])
def test_loss_normalisation_under_gradient_accumulation(name, normaliser):
    estimator = build_estimator(RLSettings(advantage_estimator=name, samples_per_prompt=2))
    assert estimator.token_normaliser == normaliser
    for loss_type, expected in (("bnpo", "mini_batch"), ("grpo", "sequences"), ("dr_grpo", "sequences")):
        other = build_estimator(RLSettings(advantage_estimator="grpo", samples_per_prompt=2, loss_type=loss_type))
        assert other.token_normaliser == expected


@pytest.mark.parametrize(("ppo", "message"), [
    ({"advantage_estimator": "ppo2"},
     "model.ppo.advantage_estimator='ppo2' is not one of " + ", ".join(ESTIMATORS)),
    ({"advantage_estimator": "rloo"},
     "model.ppo.samples_per_prompt=1 must be at least 2 with advantage_estimator='rloo' (it compares a prompt's samples)"),
    ({"advantage_estimator": "reinforce_plus_plus_baseline"},
     "model.ppo.samples_per_prompt=1 must be at least 2 with advantage_estimator='reinforce_plus_plus_baseline'"),
    ({"advantage_estimator": "reinforce_plus_plus_baseline", "samples_per_prompt": 2, "gamma": 0.9},
     "model.ppo.gamma=0.9 must be 1.0 with advantage_estimator='reinforce_plus_plus_baseline'"),
    ({"samples_per_prompt": 0}, "model.ppo.samples_per_prompt=0 must be at least 1"),
])
def test_settings_problems_name_the_flag(ppo, message):
    with pytest.raises(ConfigError) as err:
        check_settings(4, RLSettings(**ppo), GenerationSettings())
    assert message in str(err.value) and "\n" not in str(err.value)


def test_reinforce_plus_plus_accepts_one_sample_per_prompt_and_any_gamma():
    check_settings(4, RLSettings(advantage_estimator="reinforce_plus_plus", gamma=0.9), GenerationSettings())
    assert estimator_problems(SimpleNamespace(advantage_estimator="reinforce_plus_plus", gamma=0.5)) == []


@pytest.mark.parametrize(("name", "k", "trl_default"), [
    ("gae", 1, "trl 1.12's PPOConfig: kl_coef 0.05 fixed"),
    ("rloo", 2, "trl 1.12's RLOOConfig: beta 0.05 fixed"),
    ("grpo", 2, "trl 1.12's GRPOConfig: beta 0.0, loss_type dapo"),
])
def test_the_start_up_line_states_the_effective_beta_and_loss_beside_trls_defaults(name, k, trl_default):
    adaptive = build_estimator(RLSettings(advantage_estimator=name, samples_per_prompt=k)).describe()
    assert f"estimator {name}, k = {k}: KL coefficient 0.2, adaptive (target 6, horizon 10000); loss: " in adaptive
    assert trl_default in adaptive
    fixed = build_estimator(RLSettings(advantage_estimator=name, samples_per_prompt=k, init_kl_coef=0.05, adap_kl_ctrl=False))
    assert "KL coefficient 0.05, fixed" in fixed.describe()
    none = build_estimator(RLSettings(advantage_estimator=name, samples_per_prompt=k, init_kl_coef=0.0, adap_kl_ctrl=False))
    assert "KL coefficient 0 (no reference pass)" in none.describe() and not none.needs_reference
    if name == "grpo":
        assert "dapo aggregation, beta x k3 KL x ratio (bias-corrected)" in adaptive
        plain = build_estimator(RLSettings(advantage_estimator=name, samples_per_prompt=k, loss_type="bnpo",
                                           use_bias_correction_kl=False))
        assert "bnpo aggregation, beta x k3 KL (" in plain.describe()
