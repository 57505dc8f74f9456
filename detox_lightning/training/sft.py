"""Supervised summarisation stage (the course's previous lab): LoRA on dialogue -> summary pairs.

Its exported adapter is what the PPO stage starts from (`policy.adapter_name_or_path`), and is
then also the PPO reference.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from detox_lightning.models.architectures import architecture_of
from detox_lightning.io.checkpoint import TrainableStateMixin
from detox_lightning.errors import ConfigError
from detox_lightning.models.policy import PolicyConfig, count_parameters, load_lora_model, save_adapter


class SFTSummarizationModule(TrainableStateMixin, pl.LightningModule):
    """Teacher-forced LoRA fine-tuning on the data module's prompts and reference summaries.

    Args:
        policy: base model and LoRA settings (same defaults as the PPO stage).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        max_target_tokens: reference summaries are truncated to this many tokens.
        adapter_dir: where the trained adapter goes at fit end; None: `<log_dir>/adapter`.
        sample_prompts: held-out prompts whose greedy summaries are printed at fit end.
        batch_size: prompts per step (linked from `data.batch_size`).
    """

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),  # noqa: B008 - a read-only config
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        max_target_tokens: int = 128,
        adapter_dir: str | None = None,
        sample_prompts: int = 3,
        batch_size: int = 8,
    ) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise ConfigError(f"model.learning_rate={learning_rate} must be positive")
        if max_target_tokens < 1:
            raise ConfigError(f"model.max_target_tokens={max_target_tokens} must be at least 1")
        self.policy_config = policy
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.max_target_tokens, self.adapter_dir, self.sample_prompts = max_target_tokens, adapter_dir, sample_prompts
        self.batch_size = batch_size
        self.model, self.tokenizer, _ = load_lora_model(policy, with_reference=False)
        self.arch = architecture_of(self.model.config)
        trainable, total = count_parameters(self.model)
        rank_zero_info(f"SFT trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    def loss(self, batch: dict) -> torch.Tensor:
        """Cross-entropy of the reference summary given the prompt; only summary tokens are targets."""
        if "summary" not in batch:
            raise ConfigError("SFT needs a 'summary' column in the data (the reference summaries)")
        prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
        if self.arch.is_encoder_decoder:
            target = self.tokenizer(
                batch["summary"], truncation=True, max_length=self.max_target_tokens, padding=True, return_tensors="pt"
            ).to(self.device)
            # padding is masked by attention, not by id; T5 shifts the labels behind its start token itself
            labels = target.input_ids.masked_fill(target.attention_mask == 0, -100)
            return self.model(input_ids=prompt_ids, attention_mask=prompt_mask, labels=labels).loss
        # decoder-only: [prompt (left-padded), summary, EOS (right-padded)]; the prompt is context, not a target
        eos = self.tokenizer.eos_token_id
        summaries = self.tokenizer(
            batch["summary"], add_special_tokens=False, truncation=True, max_length=self.max_target_tokens - 1
        ).input_ids
        width = max(len(ids) for ids in summaries) + 1
        target = torch.full((len(summaries), width), eos, dtype=torch.long)
        target_mask = torch.zeros_like(target)
        for row, ids in enumerate(summaries):
            target[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            target_mask[row, : len(ids) + 1] = 1  # the summary and its EOS
        target, target_mask = target.to(self.device), target_mask.to(self.device)
        input_ids = torch.cat([prompt_ids, target], dim=1)
        attention_mask = torch.cat([prompt_mask, target_mask], dim=1)
        labels = torch.cat([torch.full_like(prompt_ids, -100), target.masked_fill(target_mask == 0, -100)], dim=1)
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # as generate numbers a left-padded prompt
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, labels=labels
        ).loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("sft/train_loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("sft/val_loss", self.loss(batch), prog_bar=True, batch_size=len(batch["input_ids"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)

    @torch.no_grad()
    def on_fit_end(self) -> None:
        # A broadcast from rank 0 under DDP: every rank must ask, even when adapter_dir is set (asked
        # by rank 0 alone it waits on ranks gone ahead: a crash with gloo, a hang with NCCL).
        log_dir = self.trainer.log_dir
        if not self.trainer.is_global_zero:
            return
        directory = Path(self.adapter_dir or Path(log_dir or self.trainer.default_root_dir) / "adapter")
        card = (
            "# Summarisation LoRA adapter (detox_lightning SFT stage)\n\n"
            f"- base model: `{self.policy_config.model_name_or_path}`\n"
            f"- trained with teacher forcing on dialogue -> summary pairs for {self.trainer.current_epoch} epochs\n"
            "- use as the PPO stage's `policy.adapter_name_or_path`\n"
        )
        save_adapter(self.model, self.tokenizer, directory, card)
        rank_zero_info(f"SFT adapter written to {directory}")
        data = self.trainer.datamodule
        if self.sample_prompts and data is not None and data.test_dataset is not None:
            rows = [data.test_dataset[i] for i in range(min(self.sample_prompts, len(data.test_dataset)))]
            batch = data.collate(rows)
            was_training = self.model.training
            self.model.eval()
            input_ids = batch["input_ids"].to(self.device)
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=batch["attention_mask"].to(self.device),
                max_new_tokens=self.max_target_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            self.model.train(was_training)
            summaries = self.arch.responses(out, input_ids.shape[1])
            for row, text in zip(rows, self.tokenizer.batch_decode(summaries, skip_special_tokens=True), strict=True):
                rank_zero_info(f"SFT sample: {text.strip()!r} (reference: {row.get('summary', '')!r})")
