"""rloo and grpo in the module: no value head anywhere, the real CLI, exact resume, two ranks."""

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import fit, fit_tiny_without_evaluation, tensorboard_scalars

from detox_lightning import GenerationSettings, HFClassifierReward, PolicyConfig, RLDetoxModule, RLSettings

ROOT = Path(__file__).resolve().parents[1]
CRITIC_FREE = ["--model.init_args.ppo.samples_per_prompt", "2"]


def make_module(tiny_t5, tiny_classifier, estimator, adapter=None, **ppo):
    return RLDetoxModule(
        reward=HFClassifierReward(tiny_classifier),
        policy=PolicyConfig(model_name_or_path=tiny_t5, adapter_name_or_path=adapter, lora_r=4),
        ppo=RLSettings(**({"learning_rate": 1e-2, "mini_batch_size": 4, "advantage_estimator": estimator,
                            "samples_per_prompt": 1 if estimator == "gae" else 2} | ppo)),
        generation=GenerationSettings(output_min_length=8, output_max_length=12),
        batch_size=4,
    )


@pytest.mark.parametrize("estimator", ["gae", "rloo", "grpo"])
def test_value_head_exists_only_for_gae(tiny_t5, tiny_classifier, sample_data, tmp_path, estimator):
    """rloo/grpo: no value-head parameter, no optimizer state for one, no checkpoint tensor of one."""
    pl.seed_everything(0)
    module = make_module(tiny_t5, tiny_classifier, estimator)
    trainer = fit(module, sample_data, tmp_path, iterations=1)
    trainer.save_checkpoint(tmp_path / "manual.ckpt")
    checkpoint = torch.load(tmp_path / "manual.ckpt", weights_only=True)
    params = dict(module.named_parameters())
    optimizer = module.optimizers().optimizer
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    value_params = {name for name in params if "v_head" in name}
    with_state = {name for name, p in params.items() if id(p) in optimized and optimizer.state.get(p)}
    if estimator == "gae":
        assert value_params and value_params <= with_state
        assert any("v_head" in k for k in checkpoint["state_dict"])
        return
    assert module.policy.v_head is None and not value_params
    assert with_state and all(".policy." in n and "lora_" in n for n in with_state)
    assert with_state == {n for n, p in params.items() if id(p) in optimized}  # nothing else handed over
    assert not any("v_head" in k for k in checkpoint["state_dict"])
    assert set(checkpoint["state_dict"]) == with_state


def test_grpo_without_beta_skips_the_reference(tiny_t5, tiny_classifier, sample_data, tmp_path, monkeypatch):
    from detox_lightning.models import policy

    calls = []
    original = policy.reference_mode

    def counting(model):
        calls.append(1)
        return original(model)

    monkeypatch.setattr("detox_lightning.training.module.reference_mode", counting)
    pl.seed_everything(0)
    module = make_module(tiny_t5, tiny_classifier, "grpo", init_kl_coef=0.0, adap_kl_ctrl=False)
    trainer = fit(module, sample_data, tmp_path, iterations=1)
    assert calls == [] and "objective/kl" not in trainer.logged_metrics
    assert torch.isfinite(torch.tensor(float(trainer.logged_metrics["ppo/loss/total"])))
    pl.seed_everything(0)
    fit(make_module(tiny_t5, tiny_classifier, "grpo"), sample_data, tmp_path / "with_beta", iterations=1)
    assert calls  # with a beta the reference runs: the counter can see it


def scalars(root):
    return tensorboard_scalars(root)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_cli_critic_free_fit_logs_kl_and_reward_with_zero_first_kl(tmp_path, perturbed_adapter, estimator):
    logged = fit_tiny_without_evaluation(
        tmp_path, 2, "--model.init_args.ppo.advantage_estimator", estimator, *CRITIC_FREE,
        "--model.init_args.policy.adapter_name_or_path", perturbed_adapter, timeout=600,
    )
    assert len(logged["objective/kl"]) == 2 and len(logged["env/reward_mean"]) == 2
    assert abs(logged["objective/kl"][0]) < 1e-4
    assert abs(logged["ppo/policy/ratio_first"][0] - 1) < 1e-5
    assert "env/group_reward_std" in logged and "ppo/loss/value" not in logged


@pytest.mark.slow
def test_rloo_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    from test_checkpointing import killed_and_resumed_vs_straight

    got = killed_and_resumed_vs_straight(tmp_path, "--model.init_args.ppo.advantage_estimator", "rloo", *CRITIC_FREE)
    assert not any("v_head" in k for k in got["state_dict"])


@pytest.mark.slow
def test_two_rank_rloo_keeps_groups_on_their_rank_and_logs_global_statistics(tmp_path, tiny_t5, tiny_classifier,
                                                                                sample_data):
    from test_ddp import fit_on_two_ranks, gloo_unavailable, write_config

    reason = gloo_unavailable()
    if reason:
        pytest.skip(reason)
    config = write_config(tmp_path)
    probe = tmp_path / "probe"
    result = fit_on_two_ranks(config, tmp_path / "run", probe, "--model.init_args.ppo.advantage_estimator", "rloo",
                              *CRITIC_FREE, "--model.init_args.ppo.normalize_advantages", "true")
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for record in ranks:  # each rank sampled its own prompts twice, as consecutive rows
        queries = record["rollout_queries"][-1]
        assert queries[0::2] == queries[1::2] and len(set(queries)) == len(queries) // 2
    assert set(ranks[0]["rollout_queries"][-1]).isdisjoint(ranks[1]["rollout_queries"][-1])
    for name in ("env/reward_mean", "env/group_reward_std", "objective/kl", "ppo/loss/total"):
        assert ranks[0]["logged"][-1][name] == pytest.approx(ranks[1]["logged"][-1][name], abs=1e-6), name
    # global: the logged group std is the mean over both ranks' groups
    stds = torch.cat([r["rollout_scores"][-1].view(-1, 2).std(dim=1) for r in ranks])
    assert ranks[0]["logged"][-1]["env/group_reward_std"] == pytest.approx(float(stds.mean()), abs=1e-5)
    for name, weight in ranks[0]["weights"].items():  # one model on both ranks
        torch.testing.assert_close(ranks[1]["weights"][name], weight, rtol=0, atol=0)


@pytest.mark.slow
def test_quick_start_with_rloo_detoxifies_for_the_reward_and_the_judge(tmp_path, quickstart_sft_adapter):
    """The quick start's PPO stage with RLOO (8 prompts x 2 samples: the same 16 responses an iteration)."""
    import json

    adapter = quickstart_sft_adapter
    run = [sys.executable, "train.py", "fit"]
    detox = subprocess.run(
        run + ["--config", "configs/tiny_detox.yaml", "--trainer.default_root_dir", str(tmp_path / "detox"),
               "--model.init_args.policy.adapter_name_or_path", str(adapter), "--data.batch_size", "8",
               "--model.init_args.ppo.advantage_estimator", "rloo", *CRITIC_FREE,
               "--model.init_args.ppo.normalize_advantages", "true"],
        cwd=ROOT, capture_output=True, text=True, timeout=2400, check=False,
    )
    assert detox.returncode == 0, detox.stderr[-3000:]
    report = json.loads(next((tmp_path / "detox").rglob("evaluation_report.json")).read_text())
    after = report["after"]
    assert report["before"]["eval/toxicity_mean"] > 0.02
    assert after["eval/toxicity_delta_ci_high"] < 0, after
    assert after["eval/judge_toxicity_delta_ci_high"] < 0, after
    assert after["eval/rougeL_delta"] >= -0.05, after
