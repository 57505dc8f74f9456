"""adapter_best/ across a resume: the resumed run chooses over the whole run, before the resume
too, and its adapter_best/ holds the chosen evaluation's weights, as a straight run's does."""

import json

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from detox_lightning import (
    DialogSumDataModule,
    GenerationSettings,
    HFClassifierReward,
    PolicyConfig,
    RLDetoxModule,
    RLSettings,
)
from detox_lightning.evaluation import ToxicityEvaluation
from detox_lightning.io import RLCheckpoint


def make_module(tiny_t5, tiny_classifier, adapter):
    return RLDetoxModule(
        reward=HFClassifierReward(tiny_classifier, text="response"),
        policy=PolicyConfig(model_name_or_path=tiny_t5, adapter_name_or_path=adapter),
        ppo=RLSettings(learning_rate=2e-3, mini_batch_size=4),
        generation=GenerationSettings(min_length=20, output_min_length=32, output_max_length=32),
        batch_size=16,
    )


def run(module, sample_data, root, iterations, ckpt_path=None):
    evaluation = ToxicityEvaluation(
        num_prompts=48, every_n_iterations=1, max_new_tokens=32, text="response", bootstrap_resamples=200,
        export_adapter=False, plots=False, fluency=False, max_rouge_drop=1.0,
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=iterations, default_root_dir=root, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RLCheckpoint(dirpath=str(root / "checkpoints"), every_n_iterations=1, save_top_k=-1), evaluation],
    )
    pl.seed_everything(0)
    trainer.fit(module, DialogSumDataModule(path=sample_data, batch_size=16), ckpt_path=ckpt_path)
    return json.loads((root / "evaluation_report.json").read_text())["best_adapter"]


@pytest.mark.slow
def test_a_resumed_run_chooses_and_exports_the_best_adapter_of_the_whole_run(
    tiny_t5, tiny_classifier, quickstart_sft_adapter, sample_data, tmp_path
):
    straight = run(make_module(tiny_t5, tiny_classifier, quickstart_sft_adapter), sample_data, tmp_path / "straight", 4)
    assert straight["iteration"] is not None, straight  # else the test would compare two empty choices

    # as if killed after iteration 2: resume from the straight run's own checkpoint of iteration 2, in a new directory
    resumed = run(
        make_module(tiny_t5, tiny_classifier, quickstart_sft_adapter), sample_data, tmp_path / "resumed", 4,
        ckpt_path=str(next((tmp_path / "straight" / "checkpoints").glob("epoch=0-iteration=2*.ckpt"))),
    )
    # every evaluation of the run is a candidate, those before the resume included
    seen = {int(i) for i in resumed["rejected"]} | {resumed["iteration"]}
    assert seen == {1, 2, 3, 4}, resumed
    assert resumed["iteration"] == straight["iteration"], (straight, resumed)
    a = load_file(tmp_path / "straight" / "adapter_best" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_best" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, atol=1e-6, rtol=0)
