"""Supervised summarisation stage (the course's previous lab): LoRA on dialogue -> summary pairs.

Its exported adapter is what the PPO stage starts from (`policy.adapter_name_or_path`), and is
then also the PPO reference.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from detox_lightning.errors import ConfigError
from detox_lightning.models.architectures import architecture_of
from detox_lightning.models.end_tokens import end_token_ids, turn_end_id
from detox_lightning.models.policy import PolicyConfig, count_parameters, load_lora_model, save_adapter
from detox_lightning.training.trainable_state import TrainableStateMixin


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
        """Cross-entropy of the reference summary given the prompt; only summary tokens are targets.

        The teacher-forced pass is the one the RL stage scores responses with
        (`Architecture.teacher_forced_inputs`): for a causal model the summary follows the
        left-padded prompt, for T5 it is the decoder's input behind its start token.
        """
        if "summary" not in batch:
            raise ConfigError(
                "SFT needs reference texts: a 'summary' column in the data, or data.target_column naming one "
                "(e.g. continuation.text)"
            )
        target, target_mask = self.targets(batch["summary"])  # (B, T): summary + EOS, right-padded
        inputs = self.arch.teacher_forced_inputs(
            self.model.config, batch["input_ids"], batch["attention_mask"], target, target_mask
        )
        logits = self.arch.response_logits(self.model(**inputs).logits.float(), target.shape[1])  # (B, T, V)
        return F.cross_entropy(logits[target_mask], target[target_mask])  # mean over the (N, V) target tokens

    def targets(self, summaries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summaries as (B, T) token ids ending in the end token, right-padded, and their (B, T) bool mask.

        The end token is what closes an assistant turn (a chat model's end of turn, else EOS), so the
        model learns to stop where generation stops.

        Tokenized without the tokenizer's special tokens (a causal tokenizer would put BOS in front
        of the summary) and cut to `max_target_tokens` with the EOS, as T5's tokenizer truncates.
        """
        eos = turn_end_id(self.tokenizer, end_token_ids(self.model.generation_config, self.tokenizer))
        ids = self.tokenizer(
            summaries, add_special_tokens=False, truncation=True, max_length=self.max_target_tokens - 1
        ).input_ids
        width = max(len(row) for row in ids) + 1
        target = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(target, dtype=torch.bool)
        for i, row in enumerate(ids):
            target[i, : len(row) + 1] = torch.tensor([*row, eos], dtype=torch.long)
            mask[i, : len(row) + 1] = True  # the summary and its EOS
        return target.to(self.device), mask.to(self.device)

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
