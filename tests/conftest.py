"""Shared fixtures: tiny models built offline into a per-session cache, perturbed adapters, and the
quick start's SFT adapter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The README's command runs two pytest-xdist workers on two cores, each with torch's default threads,
# so seeded figures are those of a plain run. OpenMP's idle threads spin by default, and a spinning
# thread takes a core from the other worker's work; passive waiting lets the two share the cores. It is
# read when torch loads OpenMP, so it is set before the import, and every subprocess a test starts inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """Build built-in models once per run (CI sets DETOX_LIGHTNING_CACHE itself). Under xdist the
    workers share one cache beside their own temporary roots; builds are atomic, the first wins."""
    if "DETOX_LIGHTNING_CACHE" not in os.environ:
        root = tmp_path_factory.getbasetemp()
        shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
        os.environ["DETOX_LIGHTNING_CACHE"] = str(shared / "detox_cache")
    return os.environ["DETOX_LIGHTNING_CACHE"]


@pytest.fixture(scope="session")
def tiny_t5(tiny_cache):
    from detox_lightning.offline.builtin import resolve

    return resolve("builtin:tiny-t5")


@pytest.fixture(scope="session")
def tiny_classifier(tiny_cache):
    from detox_lightning.offline.builtin import resolve

    return resolve("builtin:tiny-hate-roberta")


@pytest.fixture(scope="session")
def sample_data(tiny_cache):
    from detox_lightning.offline.builtin import resolve

    return resolve("builtin:sample-dialogsum")


def save_perturbed_adapter(base_path, targets, directory):
    """A LoRA adapter (r 4) whose B matrices are far from zero, so policy != bare base from the first step."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    from detox_lightning.models.architectures import architecture_of

    arch = architecture_of(AutoConfig.from_pretrained(base_path))
    base = arch.auto_model_class().from_pretrained(base_path)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=arch.task_type))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def perturbed_adapter(tiny_t5, tmp_path_factory):
    return save_perturbed_adapter(tiny_t5, ["q", "v"], tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_cache):
    from detox_lightning.offline.builtin import resolve

    return resolve("builtin:tiny-llama")


@pytest.fixture(scope="session")
def perturbed_causal_adapter(tiny_llama, tmp_path_factory):
    return save_perturbed_adapter(tiny_llama, ["q_proj", "v_proj"], tmp_path_factory.mktemp("causal_adapter"))


@pytest.fixture(scope="session")
def quickstart_sft_adapter(tiny_cache, tmp_path_factory):
    """The README quick start's SFT stage with 3 epochs instead of 8, trained once for every quick-start test."""
    root = tmp_path_factory.mktemp("quickstart_sft")
    sft = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/tiny_sft.yaml", "--trainer.max_epochs", "3",
         "--trainer.default_root_dir", str(root / "sft"), "--model.init_args.adapter_dir", str(root / "adapter")],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=2400, check=False,
    )
    assert sft.returncode == 0, sft.stderr[-3000:]
    return str(root / "adapter")
