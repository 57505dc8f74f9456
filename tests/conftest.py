"""Shared fixtures: tiny models built offline into a per-session cache, and a perturbed adapter."""

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """Build built-in models once per session (CI sets DETOX_LIGHTNING_CACHE itself)."""
    if "DETOX_LIGHTNING_CACHE" not in os.environ:
        os.environ["DETOX_LIGHTNING_CACHE"] = str(tmp_path_factory.mktemp("detox_cache"))
    return os.environ["DETOX_LIGHTNING_CACHE"]


@pytest.fixture(scope="session")
def tiny_t5(tiny_cache):
    from detox_lightning.builtin import resolve

    return resolve("builtin:tiny-t5")


@pytest.fixture(scope="session")
def tiny_classifier(tiny_cache):
    from detox_lightning.builtin import resolve

    return resolve("builtin:tiny-hate-roberta")


@pytest.fixture(scope="session")
def sample_data(tiny_cache):
    from detox_lightning.builtin import resolve

    return resolve("builtin:sample-dialogsum")


@pytest.fixture(scope="session")
def perturbed_adapter(tiny_t5, tmp_path_factory):
    """A LoRA adapter far from zero, so that policy != bare base model from the first step."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type=TaskType.SEQ_2_SEQ_LM)
    model = get_peft_model(base, lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tiny_cache):
    from detox_lightning.builtin import resolve

    return resolve("builtin:tiny-llama")


@pytest.fixture(scope="session")
def perturbed_causal_adapter(tiny_llama, tmp_path_factory):
    """A LoRA adapter of the tiny causal LM far from zero, so that policy != bare base model."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM)
    model = get_peft_model(base, lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    path = tmp_path_factory.mktemp("causal_adapter")
    model.save_pretrained(path)
    return str(path)
