"""SFT stage, its hand-over to PPO, the FLAN-T5 configs on real data, and the offline quick start."""

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from detox_lightning import DialogSumDataModule, PolicyConfig, ProfanityCheckReward, RLDetoxModule
from detox_lightning.models.policy import has_reference_adapter
from detox_lightning.training.settings import GenerationSettings, RLSettings
from detox_lightning.training.sft import SFTSummarizationModule

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "dialogsum"
ALL_LINEAR = ["q", "k", "v", "o", "wi_0", "wi_1", "wo", "lm_head"]


@pytest.fixture(scope="module")
def sft_run(tiny_t5, sample_data, tmp_path_factory):
    """One short SFT epoch; validation loss measured before and after."""
    pl.seed_everything(0)
    root = tmp_path_factory.mktemp("sft")
    module = SFTSummarizationModule(
        policy=PolicyConfig(model_name_or_path=tiny_t5, lora_r=32, lora_alpha=32, lora_target_modules=ALL_LINEAR, lora_dropout=0.0),
        learning_rate=1e-2,
        max_target_tokens=48,
        sample_prompts=1,
        batch_size=16,
    )
    data = DialogSumDataModule(path=sample_data, batch_size=16)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=15, limit_val_batches=3, default_root_dir=root,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=5,
    )
    before = trainer.validate(module, data, verbose=False)[0]["sft/val_loss"]
    trainer.fit(module, data)
    after = trainer.callback_metrics["sft/val_loss"].item()
    return module, before, after, Path(trainer.log_dir) / "adapter"


def test_sft_lowers_validation_loss(sft_run):
    _, before, after, _ = sft_run
    assert after < before - 0.5, (before, after)


def test_sft_trains_only_lora(sft_run):
    module, *_ = sft_run
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_sft_adapter_starts_the_ppo_stage_as_policy_and_reference(sft_run, tiny_t5, sample_data, tmp_path):
    module, _, _, adapter = sft_run
    assert (adapter / "adapter_model.safetensors").is_file()
    ppo = RLDetoxModule(
        reward=ProfanityCheckReward(text="response"),
        policy=PolicyConfig(model_name_or_path=tiny_t5, adapter_name_or_path=str(adapter)),
        ppo=RLSettings(mini_batch_size=4),
        generation=GenerationSettings(output_min_length=8, output_max_length=8),
        batch_size=4,
    )
    assert has_reference_adapter(ppo.policy)
    sft_weights = {n.replace(".policy.", "."): p for n, p in module.model.named_parameters() if "lora_" in n}
    ppo_weights = {
        n.replace(".policy.", "."): p for n, p in ppo.policy.pretrained_model.named_parameters() if ".policy." in n
    }
    assert sft_weights.keys() == ppo_weights.keys()
    assert all(torch.equal(sft_weights[n], ppo_weights[n]) for n in sft_weights)
    data = DialogSumDataModule(path=sample_data, batch_size=4, tokenizer_name_or_path=tiny_t5)
    data.setup("fit")
    _, stats = ppo.make_experience(next(iter(data.train_dataloader())))
    assert abs(stats["objective/kl"]) < 1e-4


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real DialogSum data (../shared/data/dialogsum) is absent")
@pytest.mark.parametrize("config", ["flan_t5_base_sft.yaml", "flan_t5_base.yaml"])
def test_flan_configs_point_at_the_real_data_with_one_override(config):
    result = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", f"configs/{config}", "--data.path", str(REAL_DATA), "--print_config"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"path: {REAL_DATA}" in result.stdout
    assert "google/flan-t5-base" in result.stdout
    splits = DialogSumDataModule(path=str(REAL_DATA)).load_splits()
    assert (len(splits["train"]), len(splits["test"])) == (8017, 2005)


@pytest.mark.slow
def test_quick_start_detoxifies_without_losing_the_summaries(tmp_path, quickstart_sft_adapter):
    """The README's quick start, with a shorter SFT: toxicity falls with a CI below 0 under the reward's
    classifier and under the independent judge, and ROUGE-L holds."""
    rougel_tolerance = 0.05
    adapter = quickstart_sft_adapter
    run = [sys.executable, "train.py", "fit"]
    detox = subprocess.run(
        run + ["--config", "configs/tiny_detox.yaml", "--trainer.default_root_dir", str(tmp_path / "detox"),
               "--model.init_args.policy.adapter_name_or_path", str(adapter)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False,
    )
    assert detox.returncode == 0, detox.stderr[-3000:]
    report = json.loads(next((tmp_path / "detox").rglob("evaluation_report.json")).read_text())
    before, after = report["before"], report["after"]
    assert before["eval/toxicity_mean"] > 0.02  # the SFT model did pick up rudeness
    assert after["eval/toxicity_delta_ci_high"] < 0, after
    assert after["eval/judge_toxicity_delta_ci_high"] < 0, after  # not only the classifier PPO optimised
    assert after["eval/rougeL_delta"] >= -rougel_tolerance, after

    # The rollout monitor (warn mode) printed what it saw, first and last, with no breach.
    output = detox.stdout + detox.stderr
    first = [line for line in output.splitlines() if line.startswith("monitor: first rollouts (iteration 1): distinct-1 ")]
    last = [line for line in output.splitlines() if line.startswith("monitor: last rollouts (iteration 12): ")]
    assert len(first) == 1 and "judge toxicity" in first[0] and len(last) == 1, output[-3000:]
    assert last[0].endswith("iterations in breach: none"), last
    # adapter_best/: the report names the evaluation chosen among 4, 8 and 12, and it reloads with peft.
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    from detox_lightning.offline.builtin import resolve

    best = report["best_adapter"]
    assert best["iteration"] in (4, 8, 12) and set(best["rejected"]) == {"4", "8", "12"} - {str(best["iteration"])}, best
    assert f"best adapter: iteration {best['iteration']} of 3 evaluated" in output
    log_dir = next((tmp_path / "detox").rglob("evaluation_report.json")).parent
    assert (log_dir / "adapter_best" / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(resolve("builtin:tiny-t5")), str(log_dir / "adapter_best"))
    assert any("lora_" in name for name, _ in reloaded.named_parameters())
    assert (log_dir / "toxicity_before_after.png").is_file()
