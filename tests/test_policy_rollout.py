"""Policy construction, the adapter reference, and the rollout's log-probs and values."""

import pytest
import torch

from detox_lightning.errors import ConfigError
from detox_lightning.models.architectures import SEQ2SEQ, decoder_inputs
from detox_lightning.models.policy import (
    PolicyConfig,
    build_policy,
    count_parameters,
    has_reference_adapter,
    reference_mode,
)
from detox_lightning.models.rollout import Samples, logprobs_and_values, sample


def prompts(tokenizer, n=4):
    texts = [f"#Person1#: hello number {i}, how are you today?\n#Person2#: fine, thanks." * (1 + i) for i in range(n)]
    return tokenizer(texts, padding=True, return_tensors="pt")


def generation_kwargs(tokenizer, max_new_tokens=12):
    return {"do_sample": True, "top_k": 0, "top_p": 1.0, "min_length": 3, "max_new_tokens": max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_fresh_lora_trains_only_policy_lora_and_value_head(tiny_t5):
    model, _ = build_policy(PolicyConfig(model_name_or_path=tiny_t5, lora_r=4))
    names = trainable_names(model)
    assert names and all(("lora_" in n and ".policy." in n) or n.startswith("v_head.") for n in names)
    assert {"v_head.summary.weight", "v_head.summary.bias"} <= names
    assert not has_reference_adapter(model)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total


def test_starting_adapter_is_kept_frozen_as_reference_on_the_same_base(tiny_t5, perturbed_adapter):
    model, tokenizer = build_policy(PolicyConfig(model_name_or_path=tiny_t5, adapter_name_or_path=perturbed_adapter))
    assert has_reference_adapter(model)
    params = dict(model.named_parameters())
    ref = {n for n in params if ".reference." in n}
    assert ref and not any(params[n].requires_grad for n in ref)
    # one copy of the base weights: no parameter of the base is duplicated
    base_params = [n for n in params if "lora_" not in n and not n.startswith("v_head.")]
    assert len(base_params) == len({n.replace(".base_layer", "") for n in base_params})

    enc = prompts(tokenizer)
    ids = torch.randint(3, 100, (enc.input_ids.shape[0], 6))
    args = (SEQ2SEQ, enc.input_ids, enc.attention_mask, ids, torch.ones_like(ids, dtype=torch.bool), 1.0)
    model.eval()
    with torch.no_grad():
        _, policy_lp, _ = logprobs_and_values(model, *args)
        with reference_mode(model):
            _, ref_lp, _ = logprobs_and_values(model, *args)
        with model.pretrained_model.disable_adapter():
            _, base_lp, _ = logprobs_and_values(model, *args)
    torch.testing.assert_close(ref_lp, policy_lp)  # reference = the starting adapter ...
    assert (base_lp - policy_lp).abs().max() > 1e-2  # ... which is not the bare base model
    # switching to the reference and back left requires_grad as it was
    assert trainable_names(model) == {n for n in params if ".policy." in n and "lora_" in n} | {
        "v_head.summary.weight",
        "v_head.summary.bias",
    }


def test_unknown_lora_target_names_it_and_lists_modules(tiny_t5):
    with pytest.raises(ConfigError, match=r"qq.*linear modules are named.*'q'"):
        build_policy(PolicyConfig(model_name_or_path=tiny_t5, lora_target_modules=["q", "qq"]))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_logprobs_and_values_match_a_full_forward(tiny_t5, perturbed_adapter, temperature):
    from detox_lightning.models.rollout import token_logprobs

    model, tokenizer = build_policy(PolicyConfig(model_name_or_path=tiny_t5, adapter_name_or_path=perturbed_adapter))
    model.eval()
    enc = prompts(tokenizer)
    torch.manual_seed(0)
    kwargs = generation_kwargs(tokenizer) | {"temperature": temperature}
    samples = sample(model, SEQ2SEQ, enc.input_ids, enc.attention_mask, kwargs, keep_logits=True)
    dec = decoder_inputs(samples.response_ids, model.pretrained_model.config.decoder_start_token_id)
    assert (dec[:, 0] == model.pretrained_model.config.decoder_start_token_id).all()
    assert torch.equal(dec[:, 1:], samples.response_ids[:, :-1])
    n, t = samples.response_ids.shape
    gen_logprobs = token_logprobs(samples.logits(torch.arange(n), t), samples.response_ids, temperature)
    with torch.no_grad():
        _, logprobs, values = logprobs_and_values(
            model, SEQ2SEQ, enc.input_ids, enc.attention_mask, samples.response_ids, samples.mask, temperature
        )
    m = samples.mask
    # float32 agreement, relative to log-probs of order -10 from logits of order 30: the two
    # paths round differently by up to ~4e-5, varying from run to run with MKL's buffer alignment
    # (a token misalignment would be off by whole units)
    torch.testing.assert_close(gen_logprobs[m], logprobs[m], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(samples.values[m], values[m], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("keep_logits", "chunks"), [(True, "size"), (False, "size"), (False, "given")])
def test_chunked_rollout_scores_match_one_full_batch_pass(tiny_t5, perturbed_adapter, keep_logits, chunks):
    """Chunks trimmed to their own prompt/response lengths give the whole padded batch's figures,
    whether length-sorted chunks of a size or given row groups in any order (the module's
    first-epoch micro-batches) are scored."""
    from detox_lightning.models.rollout import score_rollout
    from detox_lightning.rl.kl import full_kl
    from detox_lightning.trl_compat import entropy_from_logits

    model, tokenizer = build_policy(PolicyConfig(model_name_or_path=tiny_t5, adapter_name_or_path=perturbed_adapter))
    with torch.no_grad():  # move the policy away from its reference so that the KL is not zero
        g = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.3)
    model.eval()
    enc = prompts(tokenizer, n=5)  # prompts of five lengths, shuffled: chunks go in length order
    perm = torch.tensor([3, 0, 4, 1, 2])
    input_ids, attention_mask = enc.input_ids[perm], enc.attention_mask[perm]
    temperature = 0.7
    torch.manual_seed(0)
    kwargs = generation_kwargs(tokenizer, 16) | {"temperature": temperature, "min_length": 2}
    samples = sample(model, SEQ2SEQ, input_ids, attention_mask, kwargs, keep_logits=keep_logits)
    # Responses of several lengths, so that chunks are trimmed: end rows early with an EOS. The
    # step logits up to each new end stay valid (position t only sees tokens before t).
    ids, mask = samples.response_ids.clone(), torch.zeros_like(samples.mask)
    for row, length in enumerate([3, 16, 7, 10, 5]):
        ids[row, length - 1], ids[row, length:] = tokenizer.eos_token_id, tokenizer.pad_token_id
        mask[row, :length] = True
    samples = Samples(ids, mask, samples.step_logits, samples.values)
    groups = 3 if chunks == "size" else [torch.tensor([4, 1]), torch.tensor([0, 3, 2])]
    switches = []

    def counted_reference_mode():
        switches.append(1)
        return reference_mode(model)

    scores = score_rollout(model, SEQ2SEQ, samples, input_ids, attention_mask, temperature, groups,
                           counted_reference_mode, with_full_kl=True)
    # one switch to the reference when generation gave the policy's logits, else one a chunk (between policy forwards)
    assert len(switches) == (1 if keep_logits else 2)

    args = (SEQ2SEQ, input_ids, attention_mask, samples.response_ids, samples.mask, temperature)
    with torch.no_grad():
        logits, logprobs, values = logprobs_and_values(model, *args)
        with reference_mode(model):
            ref_logits, ref_logprobs, _ = logprobs_and_values(model, *args)
    expected = {
        "logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values,
        "entropy": entropy_from_logits(logits / temperature),
        "full_kl": full_kl(logits / temperature, ref_logits / temperature),
    }
    m = samples.mask
    assert (scores.full_kl[m] > 1e-4).all()
    for name, want in expected.items():
        got = getattr(scores, name)
        assert got.shape == m.shape
        # float32 on logits of magnitude ~30 (a far-from-zero adapter): chunks and the full batch
        # round differently by up to ~4e-5, varying from run to run with MKL's buffer alignment
        torch.testing.assert_close(got[m], want[m], rtol=1e-4, atol=1e-4, msg=lambda text, name=name: f"{name}: {text}")
        assert (got[~m] == 0).all(), name


def test_sampled_response_mask_ends_at_first_eos(tiny_t5):
    model, tokenizer = build_policy(PolicyConfig(model_name_or_path=tiny_t5, lora_r=4))
    enc = prompts(tokenizer, n=8)
    eos = tokenizer.eos_token_id
    torch.manual_seed(1)
    samples = sample(model.eval(), SEQ2SEQ, enc.input_ids, enc.attention_mask, generation_kwargs(tokenizer, 30))
    for ids, mask in zip(samples.response_ids, samples.mask):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        eos_positions = (ids == eos).nonzero().flatten()
        if len(eos_positions):
            assert eos_positions[0] == n - 1
        else:
            assert n == len(ids)
        assert (ids[n:] == tokenizer.pad_token_id).all()
