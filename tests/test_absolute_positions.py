"""A causal policy with learned absolute positions (tiny GPT-Neo, as configs/gpt_neo_125m_rtp.yaml).

Under left padding a row's first token sits at column > 0 but must be read at position 0, as
`generate` numbers it. Rotary models (the tiny Llama) give the same logits either way; GPT-2 and
GPT-Neo do not, so these tests are the ones that catch wrong position ids: every left-padded row
must score as the same prompt alone, unpadded.
"""

import pytest
import torch
from conftest import save_perturbed_adapter
from test_causal import EndRowEarly, assert_first_iteration_exact, left_padded_prompts
from transformers import LogitsProcessorList

from detox_lightning.models.architectures import CAUSAL
from detox_lightning.models.policy import PolicyConfig, build_policy
from detox_lightning.models.rollout import logprobs_and_values, sample, token_logprobs

GPT_NEO = ["--model.init_args.policy.model_name_or_path", "builtin:tiny-gpt-neo"]


@pytest.fixture(scope="session")
def tiny_gpt_neo(tiny_cache):
    from detox_lightning.offline.builtin import resolve

    return resolve("builtin:tiny-gpt-neo")


@pytest.fixture(scope="session")
def perturbed_gpt_neo_adapter(tiny_gpt_neo, tmp_path_factory):
    return save_perturbed_adapter(tiny_gpt_neo, ["q_proj", "v_proj"], tmp_path_factory.mktemp("gpt_neo_adapter"))


def unpadded_row(model, enc, response_ids, row, length):
    """Log-probs (length,) and values (length,) of one row's response after its prompt alone, no padding."""
    prompt = enc.input_ids[row][enc.attention_mask[row].bool()]
    ids = torch.cat([prompt, response_ids[row, :length]])[None]  # (1, p + length), positions 0 .. by default
    logits, _, values = model(input_ids=ids)
    p = prompt.shape[0]
    logprobs = token_logprobs(logits[:, p - 1 : p - 1 + length], response_ids[row : row + 1, :length], 1.0)
    return logprobs[0], values[0, p - 1 : p - 1 + length]


def test_the_tiny_gpt_neo_has_absolute_positions_and_no_pad_token(tiny_gpt_neo):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_gpt_neo)
    model, tokenizer = build_policy(PolicyConfig(model_name_or_path=tiny_gpt_neo, lora_r=4))
    assert config.model_type == "gpt_neo" and not hasattr(config, "rope_theta")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert set(model.pretrained_model.peft_config["policy"].target_modules) == {"q_proj", "v_proj"}


def test_left_padded_rows_score_as_the_same_prompt_alone(tiny_gpt_neo, perturbed_gpt_neo_adapter):
    """Prompts of four lengths in one left-padded batch; responses of three lengths. `generate`'s
    step scores, the teacher-forced pass over the whole padded batch and each row alone agree."""
    model, tokenizer = build_policy(PolicyConfig(model_name_or_path=tiny_gpt_neo, adapter_name_or_path=perturbed_gpt_neo_adapter))
    model.eval()
    enc = left_padded_prompts(tokenizer)
    prompt_lengths = enc.attention_mask.sum(dim=1)
    assert len(set(prompt_lengths.tolist())) == 4  # every row padded by a different amount
    width, eos = enc.input_ids.shape[1], tokenizer.eos_token_id
    kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0, "max_new_tokens": 10, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": eos, "logits_processor": LogitsProcessorList([EndRowEarly(width, eos, {1: 3, 2: 6})])}
    torch.manual_seed(0)
    samples = sample(model, CAUSAL, enc.input_ids, enc.attention_mask, kwargs, keep_logits=True)
    n, t = samples.response_ids.shape
    generated = token_logprobs(samples.logits(torch.arange(n), t), samples.response_ids, 1.0)  # (B, T)
    with torch.no_grad():
        _, logprobs, values = logprobs_and_values(model, CAUSAL, enc.input_ids, enc.attention_mask,
                                                  samples.response_ids, samples.mask, 1.0)
    for row, length in enumerate(samples.mask.sum(dim=1).tolist()):
        with torch.no_grad():
            alone_lp, alone_values = unpadded_row(model, enc, samples.response_ids, row, length)
        msg = f"row {row} (prompt of {int(prompt_lengths[row])} tokens, padded by {width - int(prompt_lengths[row])})"
        torch.testing.assert_close(logprobs[row, :length], generated[row, :length], rtol=0, atol=1e-4, msg=msg)
        torch.testing.assert_close(logprobs[row, :length], alone_lp, rtol=0, atol=1e-4, msg=msg)
        torch.testing.assert_close(generated[row, :length], alone_lp, rtol=0, atol=1e-4, msg=msg)
        torch.testing.assert_close(values[row, :length], alone_values, rtol=0, atol=1e-4, msg=msg)
        torch.testing.assert_close(samples.values[row, :length], alone_values, rtol=0, atol=1e-4, msg=msg)


def test_positions_counted_from_the_left_edge_would_be_caught(tiny_gpt_neo, perturbed_gpt_neo_adapter):
    """The model really reads positions: numbering the padded batch by column (what a forward without
    `position_ids` does) moves every padded row's log-probs far from its unpadded ones."""
    model, tokenizer = build_policy(PolicyConfig(model_name_or_path=tiny_gpt_neo, adapter_name_or_path=perturbed_gpt_neo_adapter))
    model.eval()
    enc = left_padded_prompts(tokenizer)
    response = torch.randint(3, len(tokenizer), (enc.input_ids.shape[0], 5), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([enc.input_ids, response], dim=1)
    mask = torch.cat([enc.attention_mask, torch.ones_like(response)], dim=1)
    width = enc.input_ids.shape[1]
    with torch.no_grad():
        logits, _, _ = model(input_ids=ids, attention_mask=mask)  # positions 0 .. by column, padding counted
        by_column = token_logprobs(logits[:, width - 1 : width - 1 + 5], response, 1.0)
        for row in range(ids.shape[0]):
            alone, _ = unpadded_row(model, enc, response, row, 5)
            padded = bool((enc.attention_mask[row] == 0).any())
            assert ((by_column[row] - alone).abs().max() > 1e-2) == padded, row


def test_sft_loss_on_a_left_padded_batch_is_the_per_row_label_loss(tiny_gpt_neo):
    """The SFT stage's teacher-forced pass (the Architecture's) gives the token-weighted mean of each
    row's own `labels` loss, computed alone without padding."""
    from detox_lightning.training.sft import SFTSummarizationModule

    module = SFTSummarizationModule(policy=PolicyConfig(model_name_or_path=tiny_gpt_neo, lora_r=4))
    with torch.no_grad():  # a non-zero LoRA, so the adapter is in the pass
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    module.model.eval()
    tokenizer = module.tokenizer
    enc = left_padded_prompts(tokenizer)
    summaries = ["They meet.", "Person2 explains the way to the station on the left.", "Dinner was lovely.", "Hi."]
    with torch.no_grad():
        loss = module.loss({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "summary": summaries})
        total, count = 0.0, 0
        for row, summary in enumerate(summaries):
            prompt = enc.input_ids[row][enc.attention_mask[row].bool()]
            target = torch.tensor(tokenizer(summary, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
            ids = torch.cat([prompt, target])[None]
            labels = torch.cat([torch.full_like(prompt, -100), target])[None]
            total += float(module.model(input_ids=ids, labels=labels).loss) * len(target)
            count += len(target)
    assert float(loss) == pytest.approx(total / count, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpt_neo_first_iteration_kl_is_zero_and_ratio_one(tmp_path, perturbed_gpt_neo_adapter, dtype):
    assert_first_iteration_exact(tmp_path, perturbed_gpt_neo_adapter, dtype, *GPT_NEO)


@pytest.mark.slow
def test_gpt_neo_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_gpt_neo):
    from test_checkpointing import killed_and_resumed_vs_straight

    got = killed_and_resumed_vs_straight(tmp_path, *GPT_NEO)
    assert any("q_proj.lora_A" in k for k in got["state_dict"])
