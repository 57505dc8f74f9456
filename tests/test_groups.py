"""The k samples of a group come from one prompt: consecutive rows of the rollout share their
prompt, and a group's baseline is computed from its own samples only (a baseline over mixed
prompts would train silently)."""

import pytest
import torch

from detox_lightning import (
    DialogSumDataModule,
    GenerationSettings,
    HFClassifierReward,
    PolicyConfig,
    RLDetoxModule,
    RLSettings,
)


@pytest.mark.parametrize("k", [2, 3])
def test_each_group_is_k_samples_of_one_prompt_and_its_baseline_is_its_own(tiny_t5, tiny_classifier, sample_data, k):
    module = RLDetoxModule(
        reward=HFClassifierReward(tiny_classifier, text="response"),
        policy=PolicyConfig(model_name_or_path=tiny_t5, lora_r=4),
        ppo=RLSettings(advantage_estimator="rloo", samples_per_prompt=k, mini_batch_size=k, init_kl_coef=0.0,
                       adap_kl_ctrl=False),
        generation=GenerationSettings(output_min_length=6, output_max_length=6),
        batch_size=4,
    )
    data = DialogSumDataModule(path=sample_data, batch_size=4, tokenizer_name_or_path=tiny_t5)
    data.setup("fit")
    batch = data.collate([data.train_dataset[i] for i in range(4)])
    assert len(set(batch["query"])) == 4  # four different prompts
    torch.manual_seed(0)
    exp, _ = module.make_experience(batch)

    rows = exp.input_ids.view(4, k, -1)  # (prompts, k, P)
    for p in range(4):
        assert all(torch.equal(rows[p, j], batch["input_ids"][p]) for j in range(k)), p  # one prompt per group
    record = module.last_rollout
    assert record.queries == [q for q in batch["query"] for _ in range(k)]
    # rloo with no KL: each advantage is its score minus the mean of its own group's other samples
    scores = record.scores.double().view(4, k)
    expected = scores - (scores.sum(dim=1, keepdim=True) - scores) / (k - 1)
    torch.testing.assert_close(exp.advantages[:, 0].double().view(4, k), expected, atol=1e-5, rtol=0)
