"""Gradient accumulation never changes the update: a mini-batch run as 2 micro-batches gives the
same gradient as run whole, for every estimator and GRPO loss type, with responses of different
lengths (where a per-micro-batch token mean would weigh tokens differently)."""

import lightning.pytorch as pl
import pytest
import torch
from helpers import fit

from detox_lightning import GenerationSettings, HFClassifierReward, PolicyConfig, RLDetoxModule, RLSettings

CASES = [
    ("gae", {}),
    ("rloo", {}),
    ("grpo", {"loss_type": "dapo"}),
    ("grpo", {"loss_type": "grpo"}),
    ("grpo", {"loss_type": "bnpo"}),
    ("grpo", {"loss_type": "dr_grpo"}),
    ("reinforce_plus_plus", {}),
    ("reinforce_plus_plus_baseline", {}),
]


class SGDModule(RLDetoxModule):
    """Plain SGD with lr 1: the weights after one step are the weights minus the gradient, so
    comparing weights compares gradients (Adam's g / sqrt(v) would blow rounding noise up)."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1.0)


def one_update(estimator, extra, accumulation, tiny_t5, tiny_classifier, adapter, sample_data, root):
    pl.seed_everything(0)
    k = 1 if estimator in ("gae", "reinforce_plus_plus") else 2
    module = SGDModule(
        reward=HFClassifierReward(tiny_classifier, text="response"),
        policy=PolicyConfig(model_name_or_path=tiny_t5, adapter_name_or_path=adapter),
        ppo=RLSettings(advantage_estimator=estimator, samples_per_prompt=k, mini_batch_size=8,
                       gradient_accumulation_steps=accumulation, max_grad_norm=None, **extra),
        generation=GenerationSettings(min_length=2, output_min_length=24, output_max_length=24),
        batch_size=8 // k,
    )
    start = {n: p.detach().clone() for n, p in module.trainable_parameters().items()}
    fit(module, sample_data, root, iterations=1)
    lengths = module.last_rollout.mask.sum(dim=1)
    step = {n: p.detach() - start[n] for n, p in module.trainable_parameters().items()}  # -gradient (SGD, lr 1)
    assert any(s.abs().max() > 1e-4 for s in step.values())  # a real step, not a zero gradient
    return step, lengths


@pytest.mark.slow
@pytest.mark.parametrize(("estimator", "extra"), CASES, ids=[f"{e}-{x.get('loss_type', '')}" for e, x in CASES])
def test_two_micro_batches_give_the_update_of_one(estimator, extra, tiny_t5, tiny_classifier, quickstart_sft_adapter,
                                                  sample_data, tmp_path):
    whole, lengths = one_update(estimator, extra, 1, tiny_t5, tiny_classifier, quickstart_sft_adapter, sample_data, tmp_path / "1")
    split, lengths_split = one_update(estimator, extra, 2, tiny_t5, tiny_classifier, quickstart_sft_adapter, sample_data, tmp_path / "2")
    assert torch.equal(lengths, lengths_split)  # the same rollout
    assert len(set(lengths.tolist())) > 1, lengths  # responses of different lengths: the case that can differ
    for name, gradient in whole.items():
        # float32 rounding (micro-batches are padded to their own lengths) relative to the gradient's size
        # (rloo's exp of a summed log-ratio rounds to ~2e-6 of it); a per-micro-batch token mean over
        # unequal lengths misses this by orders of magnitude
        error, scale = float((split[name] - gradient).abs().max()), float(gradient.abs().max())
        assert error <= 1e-5 * max(1.0, scale), (name, error, scale)
