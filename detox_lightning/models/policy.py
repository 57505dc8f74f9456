"""The policy: a seq2seq or causal LM with a trainable LoRA adapter and trl's value head, plus its reference.

The reference is not a second network. With a starting adapter, a frozen copy of it is loaded as
a second adapter ("reference") on the same base weights; with a fresh LoRA, the reference is the
base model with adapters disabled (a fresh LoRA starts as the identity). Either way the weights in
memory stay about 1x the base model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from detox_lightning.errors import ConfigError, out_of_range, raise_problems, user_input
from detox_lightning.io.atomic import write_directory
from detox_lightning.models.architectures import architecture_of
from detox_lightning.models.dtypes import DTYPES
from detox_lightning.offline.builtin import resolve

POLICY_ADAPTER = "policy"
REFERENCE_ADAPTER = "reference"


def base_dtype(setting: str) -> str:
    """The base weights' dtype name for `policy.dtype`: `auto` is bfloat16 where a CUDA GPU is
    visible and float32 otherwise (the command line also makes it float32 under
    `trainer.accelerator: cpu`, see `cli.resolve_auto_dtype`). On CPUs bf16 pays on some and not
    others (README, Performance: 1.6x faster on an AMD EPYC, 5% slower on an Intel Xeon, both with
    avx512_bf16; emulated on CPUs without it), so float32 is the CPU choice and bfloat16 explicit."""
    if setting != "auto":
        return setting
    return "bfloat16" if torch.cuda.is_available() else "float32"


@dataclass
class PolicyConfig:
    """What to fine-tune.

    Args:
        model_name_or_path: any seq2seq (T5) or causal (Llama, GPT-2, GPT-Neo, ...) language
            model, told apart by its config (see `architectures.architecture_of`): hub id, local
            path or `builtin:` name.
        adapter_name_or_path: a LoRA adapter to start from (hub id or path, e.g. the notebook's
            summarization checkpoint); it is loaded trainable as the policy and frozen as the
            reference, and its own LoRA settings apply. None: a fresh LoRA with the settings below.
        reference_adapter_name_or_path: the frozen reference, when it is not the starting adapter:
            an adapter path, or `base` for the base model with adapters disabled (e.g. to evaluate
            an exported adapter against plain FLAN-T5). None: the starting adapter (or `base`).
        dtype: dtype of the base weights: `float32`, `bfloat16`, or `auto` (bfloat16 when the run
            uses a CUDA GPU, as the notebook; float32 on a CPU; what flan_t5_base.yaml and the
            SmolLM2 config set). LoRA weights and the value head stay float32.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_target_modules: names of the modules that get LoRA (T5: q, k, v, o, wi_0, wi_1, wo;
            Llama: q_proj, k_proj, v_proj, o_proj, ...). None: peft's default for the model type
            (T5: q, v, as the notebook; Llama, GPT-Neo: q_proj, v_proj).
        lora_dropout: LoRA dropout (switched off during PPO when `disable_dropout`).
        trust_remote_code: allow code shipped with the model (off unless you trust the source).
    """

    model_name_or_path: str = "google/flan-t5-base"
    adapter_name_or_path: str | None = None
    reference_adapter_name_or_path: str | None = None
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    lora_r: int = 32
    lora_alpha: int = 32
    lora_target_modules: list[str] | None = None
    lora_dropout: float = 0.05
    trust_remote_code: bool = False


def check_lora_targets(model: nn.Module, targets: list[str]) -> None:
    """Raise when a LoRA target names no module (peft only fails when none matches)."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in targets if t not in leaf_names]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"policy.lora_target_modules has {unknown}, which match no module of the model; "
            f"its linear modules are named {linear}"
        )


def check_policy_config(cfg: PolicyConfig) -> None:
    """One ConfigError naming every out-of-range setting (peft's own errors name no flag)."""
    raise_problems([
        out_of_range("policy.lora_r", cfg.lora_r, 1),
        out_of_range("policy.lora_alpha", cfg.lora_alpha, 0, low_open=True),
        out_of_range("policy.lora_dropout", cfg.lora_dropout, 0, 1, high_open=True),
        None if cfg.lora_target_modules != [] else "policy.lora_target_modules is empty; name at least one module",
    ])


def not_an_adapter(flag: str, value: str) -> str:
    return f"policy.{flag}={value!r} could not be loaded as a PEFT LoRA adapter of this base model"


LM_HEAD_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForSeq2SeqLM")


def load_tokenizer_and_base(cfg: PolicyConfig):
    """The policy's tokenizer and base model, of the architecture its config names.

    The tokenizer pads on the architecture's side (right for encoder-decoder prompts, left for
    decoder-only ones, which `generate` continues), and with EOS where it has no pad token.

    Returns:
        tokenizer, base model, `Architecture`.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = resolve(cfg.model_name_or_path)
    what = f"policy.model_name_or_path={cfg.model_name_or_path!r}"
    with user_input(f"{what} could not be loaded (expected a hub id, a local model directory or a builtin: name)"):
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    named = getattr(config, "architectures", None) or []
    if named and not any(name.endswith(LM_HEAD_SUFFIXES) for name in named):
        raise ConfigError(
            f"{what} is a {named[0]}, neither a seq2seq nor a causal language model "
            f"(expected e.g. T5ForConditionalGeneration or LlamaForCausalLM)"
        )
    arch = architecture_of(config)
    with user_input(f"{what} could not be loaded as a {arch.name} language model with its tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        base = arch.auto_model_class().from_pretrained(
            path, dtype=DTYPES[base_dtype(cfg.dtype)], trust_remote_code=cfg.trust_remote_code
        )
    return arch.prepare_tokenizer(tokenizer), base, arch


def lora_targets(cfg: PolicyConfig, base: nn.Module) -> list[str]:
    """`lora_target_modules`, or peft's default for the model type (T5: q, v; Llama: q_proj, v_proj)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if cfg.lora_target_modules is not None:
        return list(cfg.lora_target_modules)
    model_type = base.config.model_type
    if model_type not in DEFAULTS:
        raise ConfigError(
            f"policy.lora_target_modules is not set and peft has no default for model type {model_type!r}; "
            f"name the linear modules to adapt"
        )
    return list(DEFAULTS[model_type])


def load_lora_model(cfg: PolicyConfig, with_reference: bool = True):
    """Base model with the trainable "policy" LoRA (fresh or from an adapter) and, if asked, the
    frozen "reference" adapter.

    Returns:
        the `PeftModel`, the tokenizer, and the reference's source (None: base, adapters disabled).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    check_policy_config(cfg)
    tokenizer, base, arch = load_tokenizer_and_base(cfg)
    if cfg.adapter_name_or_path is None:
        targets = lora_targets(cfg, base)
        check_lora_targets(base, targets)
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            target_modules=targets,
            lora_dropout=cfg.lora_dropout,
            bias="none",
            task_type=arch.task_type,
        )
        peft_model = get_peft_model(base, lora, adapter_name=POLICY_ADAPTER)
    else:
        with user_input(not_an_adapter("adapter_name_or_path", cfg.adapter_name_or_path)):
            adapter = resolve(cfg.adapter_name_or_path)
            peft_model = PeftModel.from_pretrained(base, adapter, adapter_name=POLICY_ADAPTER, is_trainable=True)
    reference = (cfg.reference_adapter_name_or_path or cfg.adapter_name_or_path) if with_reference else None
    if reference == "base":
        reference = None
    if reference is not None:
        with user_input(not_an_adapter("reference_adapter_name_or_path", reference)):
            peft_model.load_adapter(resolve(reference), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        # set_adapter also hands requires_grad to the active adapter; the policy is the one to train.
        peft_model.set_adapter(POLICY_ADAPTER)
    return peft_model, tokenizer, reference


def build_policy(cfg: PolicyConfig, value_head: bool = True) -> tuple[nn.Module, object]:
    """Load base model, LoRA adapter(s) and value head; only the policy LoRA and value head train.

    Args:
        cfg: what to load.
        value_head: False for critic-free estimators (rloo, grpo): the head is removed, so nothing
            of it is computed, handed to the optimizer or written to checkpoints.

    Returns:
        the value-head model (its `pretrained_model` is the `PeftModel`; `v_head` None without a
        value head) and the tokenizer.
    """
    peft_model, tokenizer, reference = load_lora_model(cfg)
    model = architecture_of(peft_model.config).value_head_class().from_pretrained(peft_model)
    if value_head:
        model.v_head.float()
    else:
        model.v_head = None
    freeze_all_but_policy(model)
    trainable, total = count_parameters(model)
    rank_zero_info(
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); "
        f"reference: {'frozen adapter ' + str(reference) if reference else 'base, adapters disabled'}"
    )
    return model, tokenizer


def save_adapter(peft_model, tokenizer, directory: str | Path, card: str, extra: dict | None = None) -> Path:
    """The policy adapter in PEFT format (safetensors) + tokenizer + model card, swapped in atomically.

    `PeftModel.from_pretrained(base, directory)` loads it. `extra` maps file names to tensor dicts
    saved as safetensors beside it (e.g. the PPO value head). At every instant one complete
    adapter is on disk (`io.atomic.write_directory`: the old one goes to `<directory>.old` while
    the new one is renamed in, and comes back from there after a crash between the renames).
    """
    from safetensors.torch import save_file

    def fill(staging: Path) -> Path:
        peft_model.save_pretrained(staging, selected_adapters=[POLICY_ADAPTER], safe_serialization=True)
        staged = staging / POLICY_ADAPTER  # peft saves a non-default adapter in a sub-folder
        tokenizer.save_pretrained(staged)
        for name, tensors in (extra or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staged / name))
        (staged / "README.md").write_text(card)
        return staged

    write_directory(directory, fill)
    return Path(directory)


def enable_gradient_checkpointing(model: nn.Module, zero_dropout: bool) -> None:
    """Recompute the base model's blocks in backward; with `zero_dropout`, train mode computes as eval mode.

    Every `nn.Dropout` (base, LoRA, value head) gets p = 0, and so does T5 attention's float
    `dropout`, the one dropout that is not a module.
    """
    model.pretrained_model.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
    if zero_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            elif isinstance(getattr(module, "dropout", None), float):
                module.dropout = 0.0


def freeze_all_but_policy(model: nn.Module) -> None:
    """requires_grad only on the policy adapter's LoRA weights and the value head."""
    for name, param in model.named_parameters():
        is_policy_lora = "lora_" in name and f".{POLICY_ADAPTER}." in name
        param.requires_grad_(is_policy_lora or name.startswith("v_head."))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def has_reference_adapter(model: nn.Module) -> bool:
    return REFERENCE_ADAPTER in model.pretrained_model.peft_config


@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[None]:
    """Run the frozen reference inside this block (the policy again after it).

    The reference adapter is made the active one, so it runs through the same LoRA code path as
    the policy and, in bf16, rounds as the policy does: with equal weights the two give identical
    log-probs (KL 0, ratio 1 at the first step). peft's per-call `adapter_names` would take another
    path (mixed-batch LoRA, which casts before adding) and measured a first-step KL of 0.39 in bf16.
    `set_adapter` hands `requires_grad` to the active adapter, so every flag is put back on exit.
    """
    peft_model = model.pretrained_model
    if not has_reference_adapter(model):
        with peft_model.disable_adapter():
            yield
        return
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]
    peft_model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    try:
        yield
    finally:
        peft_model.set_adapter(POLICY_ADAPTER)
        for param, flag in flags:
            param.requires_grad_(flag)
