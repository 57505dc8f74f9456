"""The trl 1.12 value head as we use it keeps working on the transformers releases our range admits."""

import warnings

import torch

from detox_lightning.models.policy import PolicyConfig, build_policy


def test_value_head_forward_passes_no_deprecated_past_key_values(tiny_t5):
    # trl's own forward passes `past_key_values=None` on every call; transformers >= 5.24 warns
    # that the argument "will be removed in version 5.40.0", after which every forward would break.
    model, tokenizer = build_policy(PolicyConfig(model_name_or_path=tiny_t5, lora_r=4))
    enc = tokenizer(["#Person1#: Hello there. #Person2#: Hi."], return_tensors="pt")
    decoder_input_ids = torch.zeros((1, 3), dtype=torch.long)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        warnings.filterwarnings("error", message=".*past_key_values.*", category=DeprecationWarning)
        logits, _, values = model(**enc, decoder_input_ids=decoder_input_ids)
        logits.sum().backward()  # the update's path: forward and backward
    assert logits.dtype == torch.float32 and logits.shape[:2] == (1, 3) and values.shape == (1, 3)
