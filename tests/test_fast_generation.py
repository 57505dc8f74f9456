"""Merged-LoRA generation and inverse-CDF sampling: the same log-probs, the same distribution, weights put back."""

import pytest
import torch

from detox_lightning import PolicyConfig
from detox_lightning.models.fast_generation import InverseCDFSampler, inverse_cdf_kwargs, merged_lora
from detox_lightning.models.policy import build_policy
from detox_lightning.models.rollout import decoder_inputs, token_logprobs

PROMPTS = ["Summarize: #Person1#: Is the train late? #Person2#: Ten minutes.", "Summarize: #Person1#: Hello there."]


@pytest.fixture(scope="module")
def policy(tiny_t5, perturbed_adapter):
    model, tokenizer = build_policy(PolicyConfig(model_name_or_path=tiny_t5, adapter_name_or_path=perturbed_adapter))
    return model.eval(), tokenizer


def base_weights(model):
    return {n: p for n, p in model.named_parameters() if "base_layer" in n}


def generate_and_forward(model, tokenizer, kwargs, merge):
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    with torch.no_grad():
        with merged_lora(model.pretrained_model) if merge else torch.autograd.grad_mode.no_grad():
            out = model.generate(**enc, max_new_tokens=12, min_length=13, return_dict_in_generate=True,
                                 output_logits=True, pad_token_id=0, eos_token_id=1, **kwargs)
        responses = out.sequences[:, 1:]
        generated = token_logprobs(torch.stack(out.logits, dim=1), responses, 1.0)
        logits, _, _ = model(**enc, decoder_input_ids=decoder_inputs(responses, 0))  # unmerged, teacher-forced
    return responses, generated, token_logprobs(logits, responses, 1.0)


@pytest.mark.parametrize("sampler", ["multinomial", "inverse_cdf"])
def test_merged_generation_keeps_the_sampled_tokens_log_probs_exact(policy, sampler):
    model, tokenizer = policy
    kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0}
    if sampler == "inverse_cdf":
        kwargs = inverse_cdf_kwargs(kwargs)
    before = {n: p.detach().clone() for n, p in base_weights(model).items()}
    tensors = {n: p.data_ptr() for n, p in base_weights(model).items()}
    _, generated, forward = generate_and_forward(model, tokenizer, kwargs, merge=True)
    # the module's own bound for generate's log-probs against the teacher-forced forward
    # (tests/test_policy_rollout.py); measured here: up to 1.7e-5 merged, 9.5e-6 unmerged
    torch.testing.assert_close(generated, forward, rtol=1e-4, atol=1e-4)
    for name, param in base_weights(model).items():  # the very tensors are back, bit for bit
        assert param.data_ptr() == tensors[name] and torch.equal(param, before[name]), name


def test_merged_lora_merges_the_active_adapter_and_nothing_else(policy):
    model, _ = policy
    peft_model = model.pretrained_model
    layer = peft_model.base_model.model.encoder.block[0].layer[0].SelfAttention.q
    original = layer.get_base_layer().weight.detach().clone()
    with merged_lora(peft_model) as n:
        assert n == 6 * 2  # tiny T5: q and v of 2 encoder self-attentions, 2 decoder self- and 2 cross-attentions
        assert layer.merged
        torch.testing.assert_close(layer.get_base_layer().weight, original + layer.get_delta_weight("policy"))
    assert not layer.merged
    with peft_model.disable_adapter(), merged_lora(peft_model) as n:
        assert n == 0  # the bare base model: nothing to merge
    model.train()
    try:
        with merged_lora(peft_model) as n:
            assert n == 0  # the update trains the adapter: never merged there
    finally:
        model.eval()


def test_merged_lora_puts_the_weights_back_after_an_error(policy):
    model, _ = policy
    tensors = {n: p.data_ptr() for n, p in base_weights(model).items()}
    with pytest.raises(RuntimeError, match="boom"), merged_lora(model.pretrained_model):
        raise RuntimeError("boom")
    assert all(p.data_ptr() == tensors[n] for n, p in base_weights(model).items())


def test_inverse_cdf_sampler_draws_from_the_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0, float("-inf"), 1.0]])
    sampler = InverseCDFSampler(temperature=0.7)
    draws = torch.stack([sampler(None, logits.expand(4000, -1)).argmax(dim=-1) for _ in range(5)]).flatten()
    counts = torch.bincount(draws, minlength=5).double()
    expected = (logits[0] / 0.7).softmax(-1).double() * len(draws)
    assert counts[3] == 0  # a masked token (probability 0) is never drawn
    nonzero = expected > 0
    chi2 = float(((counts[nonzero] - expected[nonzero]) ** 2 / expected[nonzero]).sum())
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001
    out = sampler(None, logits)
    assert int((out == 0).sum()) == 1 and int(torch.isinf(out).sum()) == 4


def test_inverse_cdf_kwargs_refuse_a_truncated_distribution():
    kwargs = inverse_cdf_kwargs({"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 0.5, "min_length": 3})
    assert kwargs["do_sample"] is False and kwargs["min_length"] == 3 and "temperature" not in kwargs
    assert kwargs["logits_processor"][-1].temperature == 0.5
    with pytest.raises(ValueError, match="top_k=50"):
        inverse_cdf_kwargs({"top_k": 50, "top_p": 1.0})
