"""The PPO LightningModule on the tiny models: first-step invariants, what trains, checkpoints."""

import lightning.pytorch as pl
import pytest
import torch
from helpers import fit

from detox_lightning import (
    GenerationSettings,
    HFClassifierReward,
    PolicyConfig,
    RLDetoxModule,
    RLSettings,
)
from detox_lightning.errors import ConfigError


def make_module(tiny_t5, tiny_classifier, adapter=None, batch_size=4, dtype="float32", **ppo):
    return RLDetoxModule(
        reward=HFClassifierReward(tiny_classifier),
        policy=PolicyConfig(model_name_or_path=tiny_t5, adapter_name_or_path=adapter, lora_r=4, dtype=dtype),
        ppo=RLSettings(**({"learning_rate": 1e-2, "mini_batch_size": batch_size} | ppo)),
        generation=GenerationSettings(output_min_length=8, output_max_length=12),
        batch_size=batch_size,
    )


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_first_iteration_has_zero_kl_and_unit_ratio_from_a_trained_adapter(
    tiny_t5, tiny_classifier, perturbed_adapter, sample_data, tmp_path, gradient_checkpointing
):
    pl.seed_everything(0)
    module = make_module(tiny_t5, tiny_classifier, adapter=perturbed_adapter, gradient_checkpointing=gradient_checkpointing)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = fit(module, sample_data, tmp_path, iterations=1)
    metrics = trainer.logged_metrics
    assert abs(float(metrics["objective/kl"])) < 1e-4
    assert float(metrics["ppo/policy/ratio_first"]) == pytest.approx(1.0, abs=1e-5)
    # only the policy LoRA and the value head moved; the base and the reference adapter did not
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert any("lora_B.policy" in n for n in changed) and any("v_head" in n for n in changed)
    assert all(".policy." in n or "v_head" in n for n in trainable)


def test_kl_grows_after_updates_and_controller_moves(tiny_t5, tiny_classifier, sample_data, tmp_path):
    """KL 0 at the first iteration, > 0 once the policy moved; the coefficient follows each logged KL."""
    import csv

    from detox_lightning.rl.controllers import AdaptiveKLController

    pl.seed_everything(0)
    # a target between the two KLs: the coefficient must first fall (KL 0 < target), then rise
    module = make_module(tiny_t5, tiny_classifier, mini_batch_size=2, ppo_epochs=2, target=1e-3, horizon=20)
    fit(module, sample_data, tmp_path, iterations=3)
    with next(tmp_path.rglob("metrics.csv")).open() as f:
        rows = list(csv.DictReader(f))
    kls = [float(r["objective/kl"]) for r in rows if r.get("objective/kl")]
    coefs = [float(r["objective/kl_coef"]) for r in rows if r.get("objective/kl_coef")]
    assert len(kls) == 3 and abs(kls[0]) < 1e-4 and min(kls[1:]) > 1e-2, kls
    replay = AdaptiveKLController(0.2, 1e-3, 20)
    for kl, coef in zip(kls, coefs, strict=True):
        assert coef == pytest.approx(replay.value)  # each iteration is penalised with the coefficient so far
        replay.update(kl, module.batch_size)
    assert module.kl_ctl.value == pytest.approx(replay.value)
    assert coefs[1] < 0.2 and module.kl_ctl.value > coefs[2]  # down after KL 0, up after KL > target


def test_checkpoint_holds_only_trainable_tensors_and_controller_state(tiny_t5, tiny_classifier, sample_data, tmp_path):
    pl.seed_everything(0)
    module = make_module(tiny_t5, tiny_classifier)
    trainer = fit(module, sample_data, tmp_path, iterations=1)
    path = tmp_path / "manual.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable
    assert checkpoint["ppo_state"]["kl_controller"]["value"] == pytest.approx(module.kl_ctl.value)

    fresh = make_module(tiny_t5, tiny_classifier)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    for name, param in fresh.named_parameters():
        if name in trainable:
            torch.testing.assert_close(param, dict(module.named_parameters())[name], rtol=0, atol=0)
    assert fresh.kl_ctl.value == module.kl_ctl.value


def test_checkpoint_of_another_adapter_shape_is_refused(tiny_t5, tiny_classifier):
    small = make_module(tiny_t5, tiny_classifier)
    other = RLDetoxModule(
        reward=HFClassifierReward(tiny_classifier),
        policy=PolicyConfig(model_name_or_path=tiny_t5, lora_r=8),
        batch_size=4,
        ppo=RLSettings(mini_batch_size=4),
    )
    with pytest.raises(ConfigError, match="another base model or adapter shape"):
        small.load_state_dict(other.state_dict())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"batch_size": 6, "mini_batch_size": 4}, "data.batch_size=6 is not divisible by model.ppo.mini_batch_size=4"),
        ({"learning_rate": -1.0}, "learning_rate=-1.0 must be positive"),
        ({"gradient_accumulation_steps": 3}, "not divisible by model.ppo.gradient_accumulation_steps=3"),
    ],
)
def test_bad_settings_are_named(tiny_t5, tiny_classifier, kwargs, message):
    batch_size = kwargs.pop("batch_size", 4)
    with pytest.raises(ConfigError, match=message):
        make_module(tiny_t5, tiny_classifier, batch_size=batch_size, **kwargs)


def test_auto_dtype_is_bfloat16_with_a_cuda_gpu_and_float32_on_a_cpu(tiny_t5, tiny_classifier, monkeypatch):
    """`policy.dtype: auto` (flan_t5_base.yaml's): bf16 base weights only where CUDA is
    visible, and then log-probs from a forward pass (generate's bf16 logits would not be exact)."""
    from detox_lightning.models.policy import base_dtype

    assert PolicyConfig().dtype == "float32"  # the Python default; the shipped GPU-or-CPU configs say auto
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = make_module(tiny_t5, tiny_classifier, dtype="auto")
    assert module.policy.pretrained_model.get_input_embeddings().weight.dtype == torch.float32
    assert module.logprobs_from_generate
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert base_dtype("auto") == "bfloat16" and base_dtype("float32") == "float32"
    module = make_module(tiny_t5, tiny_classifier, dtype="auto")  # built on the CPU still; only the choice is under test
    assert module.policy.pretrained_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert not module.logprobs_from_generate


def test_fast_sampling_merges_only_while_sampling_and_leaves_the_frozen_weights_untouched(
    tiny_t5, tiny_classifier, sample_data, perturbed_adapter, tmp_path
):
    """`generation.fast_sampling`: every generate runs with the active LoRA merged (the policy's in
    PPO, the reference's when sampling the reference, as the evaluation's "before") and the
    inverse-CDF sampler; outside it nothing is merged, the frozen weights are bit for bit what they
    were, and the adapter trains."""
    from peft.tuners.lora import LoraLayer

    from detox_lightning.models.fast_generation import InverseCDFSampler
    from detox_lightning.models.policy import POLICY_ADAPTER, REFERENCE_ADAPTER

    pl.seed_everything(0)
    module = RLDetoxModule(
        reward=HFClassifierReward(tiny_classifier),
        policy=PolicyConfig(model_name_or_path=tiny_t5, adapter_name_or_path=perturbed_adapter),
        ppo=RLSettings(learning_rate=1e-2, mini_batch_size=4),
        generation=GenerationSettings(output_min_length=8, output_max_length=12, fast_sampling=True),
        batch_size=4,
    )
    layers = [m for m in module.policy.modules() if isinstance(m, LoraLayer)]
    seen, generate = [], module.policy.generate

    def spy(*args, **kwargs):
        sampler = any(isinstance(p, InverseCDFSampler) for p in kwargs.get("logits_processor") or [])
        merged = {tuple(layer.merged_adapters) for layer in layers}
        seen.append((merged, sampler, kwargs["do_sample"]))
        return generate(*args, **kwargs)

    module.policy.generate = spy
    params = dict(module.policy.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    fit(module, sample_data, tmp_path, iterations=2)
    assert seen and all(s == ({(POLICY_ADAPTER,)}, True, False) for s in seen), seen
    assert not any(layer.merged for layer in layers)
    seen.clear()
    batch = module.tokenizer(["Summarize: #Person1#: hello there. #Person2#: hi."], return_tensors="pt")
    module.sample(batch.input_ids, batch.attention_mask, 4, reference=True)
    assert seen == [({(REFERENCE_ADAPTER,)}, True, False)], seen
    assert not any(layer.merged for layer in layers)
    frozen = [n for n, p in params.items() if not p.requires_grad]
    assert frozen and all(torch.equal(params[n], before[n]) for n in frozen)
    assert any(not torch.equal(params[n], before[n]) for n in params if "lora_B" in n)


def test_bfloat16_base_trains_float32_adapter(tiny_t5, tiny_classifier, sample_data, tmp_path):
    """`policy.dtype: bfloat16` (flan_t5_base.yaml's setting) end to end: the bf16 base stays frozen,
    the float32 LoRA and value head learn, and every statistic is finite."""
    import math

    pl.seed_everything(0)
    module = RLDetoxModule(
        reward=HFClassifierReward(tiny_classifier),
        policy=PolicyConfig(model_name_or_path=tiny_t5, lora_r=4, dtype="bfloat16"),
        ppo=RLSettings(learning_rate=1e-2, mini_batch_size=2),
        generation=GenerationSettings(output_min_length=8, output_max_length=12),
        batch_size=4,
    )
    params = dict(module.policy.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all(params[n].dtype == torch.float32 for n in trainable)
    assert params["pretrained_model.base_model.model.shared.weight"].dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in params.items()}
    trainer = fit(module, sample_data, tmp_path, iterations=2)
    metrics = {k: float(v) for k, v in trainer.logged_metrics.items()}
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["ppo/skipped_iterations"] == 0 and metrics["objective/kl"] != 0
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


def test_rng_saved_by_one_rank_is_split_again_when_resumed_on_two(tiny_t5, tiny_classifier):
    """A 1-rank checkpoint resumed on 2 ranks: both restore its state, then sample differently."""
    from types import SimpleNamespace

    module = make_module(tiny_t5, tiny_classifier)
    torch.manual_seed(0)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)  # no trainer: one rank's RNG state
    draws = []
    for rank in (0, 1):
        module._trainer = SimpleNamespace(world_size=2, global_rank=rank)
        module.on_load_checkpoint(checkpoint)
        torch.manual_seed(123 + rank)  # whatever the rank drew in between
        module.restore_resumed_rng()
        draws.append(torch.rand(8))
    module._trainer = None
    assert not torch.equal(draws[0], draws[1])
    # on one rank, the saved state is continued exactly
    module._trainer = SimpleNamespace(world_size=1, global_rank=0)
    module.on_load_checkpoint(checkpoint)
    torch.manual_seed(99)
    module.restore_resumed_rng()
    module._trainer = None
    resumed = torch.rand(8)
    torch.manual_seed(0)
    assert torch.equal(resumed, torch.rand(8))


def first_batch(sample_data, tiny_t5, n=4):
    from detox_lightning import DialogSumDataModule

    data = DialogSumDataModule(path=sample_data, batch_size=n, tokenizer_name_or_path=tiny_t5)
    data.setup("fit")
    return data.collate([data.train_dataset[i] for i in range(n)])


def moved_policy(tiny_t5, tiny_classifier, perturbed_adapter, **ppo):
    """A module whose policy adapter differs from its reference, so that every KL is non-zero."""
    module = make_module(tiny_t5, tiny_classifier, adapter=perturbed_adapter, **ppo)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in module.policy.named_parameters():
            if ".policy." in name and "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.3)
    return module


def test_rollout_logprobs_from_generate_equal_a_forward_pass(tiny_t5, tiny_classifier, perturbed_adapter, sample_data):
    module = moved_policy(tiny_t5, tiny_classifier, perturbed_adapter)
    batch = first_batch(sample_data, tiny_t5)
    runs = []
    for from_generate in (True, False):
        module.logprobs_from_generate = from_generate
        torch.manual_seed(0)
        runs.append(module.make_experience(batch))
    (a, stats_a), (b, stats_b) = runs
    assert torch.equal(a.response_ids, b.response_ids)  # the same samples either way
    for name in ("logprobs", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-4, msg=name)
    assert stats_a == pytest.approx(stats_b, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("kl_penalty", ["k1", "full"])
def test_returns_carry_the_chosen_kl_penalty(tiny_t5, tiny_classifier, perturbed_adapter, sample_data, kl_penalty):
    """gamma = lam = 1: the first token's return is score - kl_coef * the response's summed KL."""
    from detox_lightning.models.policy import reference_mode
    from detox_lightning.models.rollout import logprobs_and_values
    from detox_lightning.rl.kl import full_kl

    module = moved_policy(tiny_t5, tiny_classifier, perturbed_adapter, kl_penalty=kl_penalty, gamma=1.0, lam=1.0)
    batch = first_batch(sample_data, tiny_t5)
    torch.manual_seed(0)
    exp, _ = module.make_experience(batch)
    args = (module.arch, exp.input_ids, exp.attention_mask, exp.response_ids, exp.mask, 1.0)
    with torch.no_grad():
        logits, logprobs, _ = logprobs_and_values(module.policy, *args)
        with reference_mode(module.policy):
            ref_logits, ref_logprobs, _ = logprobs_and_values(module.policy, *args)
    if kl_penalty == "full":
        kl = full_kl(logits, ref_logits)
    else:
        kl = logprobs - ref_logprobs
    score = module.reward(batch["query"], module.decode(exp.response_ids))
    expected = score - module.ppo.init_kl_coef * (kl * exp.mask).sum(dim=1)
    assert (kl * exp.mask).abs().sum() > 0.1
    torch.testing.assert_close(exp.returns[:, 0], expected, rtol=1e-4, atol=1e-4)


def saved_bytes_and_grads(module, exp):
    """One update-mode forward/backward: bytes autograd saved outside checkpointed blocks, and the gradients."""
    from detox_lightning.models.rollout import logprobs_and_values

    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    module.policy.zero_grad()
    module.update_mode()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, logprobs, values = logprobs_and_values(
            module.policy, module.arch, exp.input_ids, exp.attention_mask, exp.response_ids, exp.mask, 1.0
        )
    ((logprobs * exp.mask).sum() + (values * exp.mask).sum()).backward()
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    return sum(saved), grads


def test_gradient_checkpointing_gives_the_same_gradients_from_fewer_saved_activations(
    tiny_t5, tiny_classifier, perturbed_adapter, sample_data
):
    batch = first_batch(sample_data, tiny_t5)
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same value head
        module = moved_policy(tiny_t5, tiny_classifier, perturbed_adapter, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        exp, _ = module.make_experience(batch)
        runs.append(saved_bytes_and_grads(module, exp))
    (plain_bytes, plain_grads), (ckpt_bytes, ckpt_grads) = runs
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        # recomputation re-runs the same float32 ops (as the rollout tests, MKL may round a little differently)
        error = (ckpt_grads[name] - grad).norm() / grad.norm()
        assert error < 1e-4, (name, float(error))
