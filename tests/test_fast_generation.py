"""Fast sampling: merged-LoRA generation, few-row matmuls transposed and inverse-CDF sampling: the same log-probs, the same distribution, weights and layers put back."""

import pytest
import torch

from detox_lightning import PolicyConfig
from detox_lightning.models.fast_generation import (
    FEW_ROWS,
    InverseCDFSampler,
    few_row_linears,
    inverse_cdf_kwargs,
    merged_lora,
)
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


def implied_distribution(sampler, logits):
    """Each token's probability under the sampler: the width of its CDF interval over the total."""
    cdf = sampler.cdf(logits)  # (B, V) float64
    widths = torch.diff(cdf, dim=-1, prepend=torch.zeros_like(cdf[:, :1]))
    return widths / cdf[:, -1:]


@pytest.mark.parametrize("vocab", [32_128, 151_936])
@pytest.mark.parametrize("std", [1.0, 3.0, 8.0], ids=["flat", "peaked", "very-peaked"])
def test_inverse_cdf_sampler_implies_the_softmax_at_real_vocabulary_sizes(vocab, std):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=generator) * std  # float32, as generate's scores
    logits[:, :7] = float("-inf")  # masked tokens (e.g. min_length's EOS ban)
    sampler = InverseCDFSampler(temperature=0.9)
    implied = implied_distribution(sampler, logits)
    exact = (logits.double() / 0.9).softmax(dim=-1)
    total_variation = 0.5 * (implied - exact).abs().sum(dim=-1)
    assert float(total_variation.max()) < 1e-9
    assert bool((implied[:, :7] == 0).all())  # probability 0 stays 0
    # every token of probability above 1e-12 can be drawn (below float64's step near the top of the
    # CDF, ~1e-16, a token's interval may round to nothing: far inside the 1e-9 bound above)
    assert bool((implied[exact > 1e-12] > 0).all())
    # and the draw maps the middle of each interval to its own token, the smallest such ones included
    rows = torch.arange(4)
    tiny = exact.masked_fill(exact <= 1e-12, 2.0).argmin(dim=-1)  # each row's least likely such token
    cdf = sampler.cdf(logits)
    middle = (cdf[rows, tiny] - 0.5 * implied[rows, tiny] * cdf[:, -1]) / cdf[:, -1]
    assert torch.equal(sampler.draw(cdf, middle.unsqueeze(1)).squeeze(1), tiny)


def test_a_float32_cdf_would_fail_the_distribution_check():
    """The check above can fail: the same widths from a float32 CDF miss the bound by orders of magnitude."""
    logits = torch.randn(4, 151_936, generator=torch.Generator().manual_seed(0)) * 3.0
    cdf32 = logits.softmax(dim=-1).cumsum(dim=-1)
    widths = torch.diff(cdf32, dim=-1, prepend=torch.zeros_like(cdf32[:, :1])).double() / cdf32[:, -1:].double()
    exact = logits.double().softmax(dim=-1)
    assert float(0.5 * (widths - exact).abs().sum(dim=-1).max()) > 1e-6


def test_inverse_cdf_sampling_through_generate_repeats_under_a_seed(policy):
    model, tokenizer = policy
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    kwargs = inverse_cdf_kwargs({"top_k": 0, "top_p": 1.0, "temperature": 1.0})
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        with torch.no_grad():
            runs.append(model.generate(**enc, max_new_tokens=10, min_length=11, pad_token_id=0, eos_token_id=1, **kwargs))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(4)
    with torch.no_grad():
        other = model.generate(**enc, max_new_tokens=10, min_length=11, pad_token_id=0, eos_token_id=1, **kwargs)
    assert not torch.equal(runs[0], other)


def test_a_failing_merge_surfaces_its_own_error_and_puts_back_what_was_merged(policy, monkeypatch):
    from peft.tuners.lora import LoraLayer

    model, _ = policy
    weights = {n: p.data.clone() for n, p in base_weights(model).items()}
    layers = [m for m in model.pretrained_model.modules() if isinstance(m, LoraLayer)]
    calls = []

    def failing_on_the_third(original):
        def delta(adapter):
            calls.append(adapter)
            if len(calls) == 3:  # two layers merged, the third fails
                raise RuntimeError("delta weight failed")
            return original(adapter)

        return delta

    for layer in layers:
        monkeypatch.setattr(layer, "get_delta_weight", failing_on_the_third(layer.get_delta_weight))
    with pytest.raises(RuntimeError, match="delta weight failed"), merged_lora(model.pretrained_model):
        pass
    assert len(calls) == 3
    assert all(torch.equal(p.data, weights[n]) for n, p in base_weights(model).items())
    assert all(not layer.merged_adapters for layer in layers)


class OwnForward(torch.nn.Linear):
    """A Linear whose instance carries its own `forward` (as a hook of accelerate's would)."""


def few_row_model():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "head": torch.nn.Linear(64, 1000),  # a vocabulary-sized output, with bias
        "proj": torch.nn.Linear(64, 48, bias=False),
        "bf16": torch.nn.Linear(64, 48).to(torch.bfloat16),
        "hooked": torch.nn.Linear(64, 48),
    })
    model["hooked"].forward = model["hooked"].forward  # an instance attribute, bound to the same method
    return model


@pytest.mark.parametrize("shape", [(1, 64), (16, 1, 64), (FEW_ROWS, 64), (2, FEW_ROWS // 2 + 1, 64)],
                         ids=["1-row", "16-rows-3d", "the-limit", "past-the-limit"])
def test_few_row_linears_compute_the_same_product(shape):
    model = few_row_model()
    x = torch.randn(*shape)
    with few_row_linears(model) as n:
        assert n == 2  # float32 CPU Linear layers without their own forward: head and proj, not bf16 or hooked
        assert "forward" in vars(model["head"]) and "forward" in vars(model["proj"])
        got = {k: model[k](x) for k in ("head", "proj")}
    for name, y in got.items():
        layer = model[name]
        exact = x.double() @ layer.weight.double().T + (0 if layer.bias is None else layer.bias.double())
        assert y.shape == (*shape[:-1], layer.out_features)
        torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)  # float32 rounding of a 64-term sum
        torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)  # and F.linear's own result
    assert "forward" not in vars(model["head"]) and "forward" not in vars(model["proj"])
    assert "forward" in vars(model["hooked"])  # its own forward kept


def test_few_row_linears_put_every_forward_back_after_an_error():
    model = few_row_model()
    with pytest.raises(RuntimeError, match="boom"), few_row_linears(model):
        raise RuntimeError("boom")
    assert not any("forward" in vars(m) for name, m in model.items() if name != "hooked")


@pytest.mark.parametrize("fast", [True, False])
def test_the_module_transposes_few_row_matmuls_only_under_fast_sampling(tiny_t5, tiny_classifier, fast):
    from detox_lightning import GenerationSettings, HFClassifierReward, RLDetoxModule

    module = RLDetoxModule(reward=HFClassifierReward(tiny_classifier), policy=PolicyConfig(model_name_or_path=tiny_t5, lora_r=4),
                           generation=GenerationSettings(fast_sampling=fast), batch_size=4)
    head = module.policy.pretrained_model.get_output_embeddings()
    with module.generation_weights():
        assert ("forward" in vars(head)) is fast
    assert "forward" not in vars(head)
