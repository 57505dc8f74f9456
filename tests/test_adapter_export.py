"""Adapter export: `save_adapter` swaps the new adapter in so that one complete adapter is always on disk."""

import shutil
from pathlib import Path

import pytest
import torch

from detox_lightning.models.policy import POLICY_ADAPTER, PolicyConfig, load_lora_model, save_adapter


@pytest.fixture
def lora(tiny_t5):
    model, tokenizer, _ = load_lora_model(PolicyConfig(model_name_or_path=tiny_t5, lora_r=4), with_reference=False)
    return model, tokenizer


def lora_weights(model) -> dict[str, torch.Tensor]:
    """LoRA tensors by adapter-independent name (`...lora_A.policy.weight` and `...lora_A.weight` alike)."""
    return {
        name.replace(f".{POLICY_ADAPTER}.", ".").replace(".default.", "."): p.detach().clone()
        for name, p in model.named_parameters()
        if "lora_" in name
    }


def perturb(model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return lora_weights(model)


def load(tiny_t5, directory: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    return lora_weights(PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), str(directory)))


def assert_holds(tiny_t5, directory: Path, weights: dict[str, torch.Tensor], card: str) -> None:
    loaded = load(tiny_t5, directory)
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[n], weights[n]) for n in weights)
    assert (directory / "README.md").read_text() == card


def test_a_failure_between_the_renames_leaves_the_old_adapter_in_place(lora, tiny_t5, tmp_path, monkeypatch):
    model, tokenizer = lora
    target = tmp_path / "adapter"
    old = perturb(model, 0)
    save_adapter(model, tokenizer, target, "old")
    perturb(model, 1)

    renames = []
    rename = Path.rename

    def fail_moving_the_new_one_in(self, new):
        renames.append((Path(self).name, Path(new).name))
        if Path(self).name == POLICY_ADAPTER:  # the staged new adapter (peft's sub-folder)
            raise OSError("injected: crash before the new adapter is in place")
        return rename(self, new)

    monkeypatch.setattr(Path, "rename", fail_moving_the_new_one_in)
    with pytest.raises(OSError, match="injected"):
        save_adapter(model, tokenizer, target, "new")
    monkeypatch.undo()

    assert_holds(tiny_t5, target, old, "old")
    # it failed between the renames: the old one had gone aside and was put back
    assert renames == [("adapter", "adapter.old"), (POLICY_ADAPTER, "adapter"), ("adapter.old", "adapter")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no aside or staging dir left


@pytest.mark.parametrize("killed", ["between the renames", "before the old one was removed"])
def test_the_next_save_recovers_from_a_kill_during_the_swap(lora, tiny_t5, tmp_path, killed):
    model, tokenizer = lora
    target, aside = tmp_path / "adapter", tmp_path / "adapter.old"
    old = perturb(model, 0)
    save_adapter(model, tokenizer, target, "old")
    if killed == "between the renames":  # only the aside copy exists, and it is the documented survivor
        target.rename(aside)
        assert_holds(tiny_t5, aside, old, "old")
    else:  # the new one is in place, a stale aside copy beside it
        shutil.copytree(target, aside)
    new = perturb(model, 1)
    save_adapter(model, tokenizer, target, "new")
    assert_holds(tiny_t5, target, new, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
