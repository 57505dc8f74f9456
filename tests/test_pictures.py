"""Before/after toxicity pictures: TensorBoard histograms at each evaluation, and the PNG in the log dir."""

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest

from detox_lightning import DialogSumDataModule, GenerationSettings, HFClassifierReward, PolicyConfig, RLDetoxModule
from detox_lightning.evaluation.pictures import PNG_NAME
from detox_lightning.evaluation.toxicity import ToxicityEvaluation
from detox_lightning.rewards.classifiers import ProfanityCheckReward
from detox_lightning.training.settings import RLSettings


@pytest.fixture(scope="module")
def run(tiny_t5, tiny_classifier, perturbed_adapter, sample_data, tmp_path_factory):
    """Two iterations, evaluated at each, with a judge; TensorBoard logger (the default)."""
    pl.seed_everything(0)
    root = tmp_path_factory.mktemp("pictures")
    module = RLDetoxModule(
        reward=HFClassifierReward(tiny_classifier),
        policy=PolicyConfig(model_name_or_path=tiny_t5, adapter_name_or_path=perturbed_adapter),
        ppo=RLSettings(learning_rate=1e-2, mini_batch_size=4),
        generation=GenerationSettings(output_min_length=8, output_max_length=8),
        batch_size=4,
    )
    evaluation = ToxicityEvaluation(
        num_prompts=12, every_n_iterations=1, max_new_tokens=10, batch_size=12, judge=ProfanityCheckReward(), bootstrap_resamples=50
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, default_root_dir=root, callbacks=[evaluation],
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )
    trainer.fit(module, DialogSumDataModule(path=sample_data, batch_size=4))
    return evaluation, Path(trainer.log_dir)


def test_tensorboard_has_before_and_after_histograms_at_each_evaluation(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    evaluation, log_dir = run
    events = EventAccumulator(str(next(log_dir.glob("events.out.tfevents.*"))), size_guidance={"histograms": 0})
    events.Reload()
    for name in ("toxicity", "judge_toxicity"):
        for which in ("before", "after"):
            histograms = events.Histograms(f"eval/{name}_hist_{which}")
            assert [h.step for h in histograms] == [1, 2]  # one per evaluation during fit
            assert all(h.histogram_value.num == 12 for h in histograms)  # every prompt's response
    # the last "after" histogram is the final evaluation's, the "before" one the reference's (the judge's
    # figures vary from text to text; the tiny classifier gives every insult-free text the same one)
    last = events.Histograms("eval/judge_toxicity_hist_after")[-1].histogram_value
    assert last.sum == pytest.approx(float(evaluation.last_outputs.judge_toxicity.sum()), rel=1e-5)
    before = events.Histograms("eval/judge_toxicity_hist_before")[-1].histogram_value
    assert before.sum == pytest.approx(float(evaluation.before.judge_toxicity.sum()), rel=1e-5)
    assert last.sum != pytest.approx(before.sum, rel=1e-6)

def test_the_png_shows_the_latest_evaluation(run):
    import matplotlib.image

    _, log_dir = run
    image = matplotlib.image.imread(log_dir / PNG_NAME)
    assert image.ndim == 3 and image.shape[1] > 2 * image.shape[0]  # two panels side by side: reward classifier, judge
    assert np.ptp(image[..., :3]) > 0.5  # not a blank canvas
    assert not list(log_dir.glob(".*.tmp"))
