"""Evaluation across a resume: "before" is the frozen reference's, however far the policy has moved."""

from types import SimpleNamespace

import lightning.pytorch as pl

from detox_lightning import DialogSumDataModule, GenerationSettings, HFClassifierReward, PolicyConfig, RLDetoxModule
from detox_lightning.evaluation.toxicity import ToxicityEvaluation
from detox_lightning.io.checkpoint import RLCheckpoint
from detox_lightning.training.settings import RLSettings


def make_module(tiny_t5, tiny_classifier):
    # A high learning rate, so that two iterations move the policy's samples away from the reference's.
    return RLDetoxModule(
        reward=HFClassifierReward(tiny_classifier),
        policy=PolicyConfig(model_name_or_path=tiny_t5, lora_r=4),
        ppo=RLSettings(learning_rate=5e-2, mini_batch_size=4),
        generation=GenerationSettings(output_min_length=8, output_max_length=12),
        batch_size=4,
    )


def trainer_for(root, callbacks):
    return pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, default_root_dir=root, callbacks=callbacks,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )


def test_before_of_a_resumed_run_comes_from_the_reference_not_the_trained_policy(
    tiny_t5, tiny_classifier, sample_data, tmp_path
):
    pl.seed_everything(0)
    data = DialogSumDataModule(path=sample_data, batch_size=4)
    trainer_for(tmp_path, [RLCheckpoint(dirpath=str(tmp_path / "ckpt"))]).fit(
        make_module(tiny_t5, tiny_classifier), data
    )

    resumed = make_module(tiny_t5, tiny_classifier)
    evaluation = ToxicityEvaluation(num_prompts=8, max_new_tokens=10, batch_size=8, export_adapter=False)
    # What `generate_and_score` reads of a trainer, for evaluations outside the fit.
    outside = SimpleNamespace(
        datamodule=DialogSumDataModule(path=sample_data, tokenizer_name_or_path=tiny_t5), global_rank=0, world_size=1
    )
    reference = evaluation.generate_and_score(outside, resumed, reference=True)
    # The resumed fit has no iteration left: it restores the trained policy, evaluates before and after.
    trainer_for(tmp_path, [evaluation]).fit(resumed, data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))

    trained = evaluation.generate_and_score(outside, resumed, reference=False)
    assert trained.responses != reference.responses  # else "before" could not tell them apart
    assert evaluation.before.responses == reference.responses
    assert evaluation.last_outputs.responses == trained.responses
