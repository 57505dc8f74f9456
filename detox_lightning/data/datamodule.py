"""DialogSum (or any) prompts as a LightningDataModule: load, filter, prompt (plain or chat), tokenize, split."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from detox_lightning.data.files import data_files, load_dialogues
from detox_lightning.data.rows import RowFilter, check_field, get_field
from detox_lightning.data.sampler import EpochSeededSampler, ResumableDataLoader
from detox_lightning.errors import ConfigError, user_input
from detox_lightning.models.architectures import architecture_of, pad_with_eos
from detox_lightning.offline.builtin import resolve

NOTEBOOK_PROMPT = "\nSummarize the following conversation.\n\n{dialogue}\n\nSummary:\n"


class DialogSumDataModule(pl.LightningDataModule):
    """Filtered DialogSum dialogues wrapped in the summarisation prompt, or any prompt dataset.

    For other data (e.g. trl's classic recipe on RealToxicityPrompts) name the text with
    `text_column` (`prompt.text`), keep rows with `filter` (`prompt.toxicity > 0.3`) and set
    `prompt_template: "{dialogue}"` to use the text as it is; without a `summary` column the
    evaluation reports toxicity and length and skips ROUGE.

    Args:
        path: hub id (`knkarthick/dialogsum`), a local file (json/jsonl/csv/parquet), a directory of
            `<split>.<ext>` files, a dict {split: file}, or `builtin:sample-dialogsum`.
        split: which split to take the prompts from (the notebook uses `train` only).
        min_chars: keep dialogues longer than this many characters.
        max_chars: keep dialogues of at most this many characters.
        prompt_template: the instruction; `{dialogue}` is replaced by the dialogue (the text).
        prompt_format: `plain` (the template as it is), `chat` (the template as one user message
            through the tokenizer's chat template, `add_generation_prompt=True`, as chat models
            expect) or `auto` (chat when the tokenizer has a chat template).
        text_column: the column holding the text: `dialogue`, or a nested field such as `prompt.text`.
        filter: keep only rows where `<field> <op> <number>` holds, e.g. `prompt.toxicity > 0.3`
            (op one of > >= < <= == !=), or `<field> == true|false` on a boolean field, e.g.
            `challenging == true`; None: every row.
        target_column: the reference text (the SFT stage's target, ROUGE's reference): `summary`,
            or a nested field such as `continuation.text` to train prompt -> continuation. The
            default may be absent (no ROUGE, no SFT); any other must exist.
        test_size: fraction held out for evaluation.
        split_seed: seed of the train/test split (used when `shuffle_split`).
        shuffle_split: shuffle before splitting (the notebook does not).
        batch_size: prompts per PPO iteration.
        max_prompt_tokens: cut the dialogue of longer prompts so that the whole prompt, instruction
            included, takes at most this many tokens; None: keep them whole.
        tokenizer_name_or_path: tokenizer to use; None: the trained model's own.
        num_workers: DataLoader workers.
        predict_path: the dialogues `python train.py predict` summarises: a jsonl/json/csv/parquet
            file with a `dialogue` column, every row kept (no length filter); None: the held-out split.
    """

    def __init__(
        self,
        path: str | dict[str, str] = "knkarthick/dialogsum",
        split: str = "train",
        min_chars: int = 200,
        max_chars: int = 1000,
        prompt_template: str = NOTEBOOK_PROMPT,
        test_size: float = 0.2,
        split_seed: int = 42,
        shuffle_split: bool = False,
        batch_size: int = 16,
        max_prompt_tokens: int | None = None,
        tokenizer_name_or_path: str | None = None,
        num_workers: int = 0,
        predict_path: str | None = None,
        prompt_format: Literal["auto", "chat", "plain"] = "auto",
        text_column: str = "dialogue",
        filter: str | None = None,
        target_column: str = "summary",
    ) -> None:
        super().__init__()
        problems = []
        if prompt_format not in ("auto", "chat", "plain"):
            problems.append(f"data.prompt_format={prompt_format!r} is not one of auto, chat, plain")
        try:
            self.row_filter = RowFilter.parse(filter) if filter is not None else None
        except ConfigError as err:
            problems.append(str(err))
        if min_chars >= max_chars:
            problems.append(f"data.min_chars={min_chars} must be smaller than data.max_chars={max_chars}")
        if "{dialogue}" not in prompt_template:
            problems.append("data.prompt_template must contain '{dialogue}'")
        if not 0.0 < test_size < 1.0:
            problems.append(f"data.test_size={test_size} must lie in (0, 1)")
        if batch_size < 1:
            problems.append(f"data.batch_size={batch_size} must be at least 1")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            problems.append(f"data.max_prompt_tokens={max_prompt_tokens} must be at least 1")
        if problems:
            raise ConfigError("; ".join(problems))
        self.path = path
        self.split = split
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.prompt_template = prompt_template
        self.test_size = test_size
        self.split_seed = split_seed
        self.shuffle_split = shuffle_split
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.num_workers = num_workers
        self.predict_path = predict_path
        self.prompt_format = prompt_format
        self.text_column = text_column
        self.filter = filter
        self.target_column = target_column
        self.predict_dataset = None
        self.tokenizer = None
        self.train_dataset = None
        self.test_dataset = None

    def load_splits(self):
        """Load, filter and split the dialogues (untokenized); raises on unusable data.

        Returns:
            a `DatasetDict` with `train` and `test`.
        """
        from datasets import load_dataset

        path = self.path if isinstance(self.path, dict) else resolve(self.path)
        local = data_files(path)
        if local is not None:
            builder, files = local
            if self.split not in files:
                raise ConfigError(f"data.split={self.split!r} is not among the data files' splits {sorted(files)}")
            for file in files.values():
                if Path(file).stat().st_size == 0:
                    raise ConfigError(f"data.path: {file!r} is empty; expected rows with a 'dialogue' column")
        # datasets' own errors (an unreadable file, a hub id that does not exist) name no setting
        with user_input(f"data.path={self.path!r} could not be read as a dataset (split {self.split!r})"):
            if local is None:
                dataset = load_dataset(path, split=self.split)
            else:
                dataset = load_dataset(builder, data_files={self.split: files[self.split]}, split=self.split)
        if self.text_column == "dialogue" and "dialogue" not in dataset.column_names:
            raise ConfigError(f"data.path={self.path!r} has no 'dialogue' column; its columns are {dataset.column_names}")
        check_field(dataset.column_names, dataset.features, self.text_column, "data.text_column")
        if self.row_filter is not None:
            check_field(dataset.column_names, dataset.features, self.row_filter.field, "data.filter")
        if self.text_column != "dialogue":  # the text under the name the rest of the pipeline reads
            column = self.text_column
            dataset = dataset.map(lambda row: {"dialogue": get_field(row, column)})
        if self.target_column != "summary":  # the reference under the name SFT and ROUGE read
            check_field(dataset.column_names, dataset.features, self.target_column, "data.target_column")
            target = self.target_column
            dataset = dataset.map(lambda row: {"summary": get_field(row, target)})
        n_rows = len(dataset)
        if self.row_filter is not None:
            dataset = dataset.filter(self.row_filter)
            if len(dataset) < 2:
                raise ConfigError(
                    f"data.filter={self.filter!r} keeps {len(dataset)} of {n_rows} rows; at least 2 are needed "
                    f"to split train and test"
                )
        n_kept = len(dataset)
        lo, hi = self.min_chars, self.max_chars
        dataset = dataset.filter(lambda row: lo < len(row["dialogue"] or "") <= hi)
        if len(dataset) < 2:
            raise ConfigError(
                f"{len(dataset)} of {n_kept} dialogues have {lo} < characters <= {hi} "
                f"(data.min_chars, data.max_chars); at least 2 are needed to split train and test"
            )
        return dataset.train_test_split(test_size=self.test_size, shuffle=self.shuffle_split, seed=self.split_seed)

    def prepare_data(self) -> None:
        # Runs before Lightning creates the log dir: bad data stops the run with nothing written.
        self.load_splits()
        if self.tokenizer_name_or_path is not None or self.trainer is not None:
            self.tokenizer = self.load_tokenizer()
            self.check_chat_template()
            self.check_prompt_budget()
        if self.predict_path is not None and self.trainer is not None and self.trainer.predicting:
            load_dialogues(self.predict_path)

    def setup(self, stage: str) -> None:
        if self.train_dataset is not None:
            return
        self.tokenizer = self.load_tokenizer()
        self.check_chat_template()
        self.check_prompt_budget()
        splits = self.load_splits().map(self.tokenize, remove_columns=["dialogue"])
        self.train_dataset, self.test_dataset = splits["train"], splits["test"]
        if len(self.train_dataset) < self.batch_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.train_dataset)} training prompts"
            )

    def load_tokenizer(self):
        if self.tokenizer_name_or_path is not None:  # standalone: pad as the policy would (policy.py)
            from transformers import AutoConfig, AutoTokenizer

            path = resolve(self.tokenizer_name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            try:
                return architecture_of(AutoConfig.from_pretrained(path)).prepare_tokenizer(tokenizer)
            except (OSError, ValueError):  # a tokenizer without a model config: its own side
                return pad_with_eos(tokenizer)
        if self.trainer is None or not hasattr(self.trainer.lightning_module, "tokenizer"):
            raise ConfigError("data.tokenizer_name_or_path is needed when the data module is used without a model")
        return self.trainer.lightning_module.tokenizer

    def check_prompt_budget(self) -> None:
        """Raise when `max_prompt_tokens` cannot hold the template with at least one dialogue token."""
        if self.max_prompt_tokens is None:
            return
        template = len(self.prompt_ids(""))
        if template >= self.max_prompt_tokens:
            raise ConfigError(
                f"data.max_prompt_tokens={self.max_prompt_tokens} leaves no room for the dialogue: the prompt "
                f"template alone takes {template} tokens (special tokens included); raise it above {template}"
            )
        if not self.tokenizer.is_fast:
            raise ConfigError(
                "data.max_prompt_tokens needs a fast tokenizer (it cuts the dialogue at token offsets); "
                f"{type(self.tokenizer).__name__} is not one"
            )

    def fit_prompt(self, dialogue: str) -> list[int]:
        """The prompt's token ids, its dialogue cut at a token boundary to fit `max_prompt_tokens`.

        Only the dialogue is cut: truncating the formatted prompt would drop the instruction after it
        (the notebook's `Summary:`). Tokens merge across the template's edges (the tiny T5 writes
        `conversation.\n\n#Person1#:` as one), so the dialogue's own token count does not tell how
        much fits; a binary search over its token boundaries finds the longest prefix that does.
        """
        input_ids = self.prompt_ids(dialogue)
        limit = self.max_prompt_tokens
        if limit is None or len(input_ids) <= limit:
            return input_ids
        offsets = self.tokenizer(dialogue, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        ends = [0] + [end for _, end in offsets]  # ends[k]: characters of the first k dialogue tokens

        def prompt_ids(k: int) -> list[int]:
            return self.prompt_ids(dialogue[: ends[k]])

        fits, too_long = 0, len(ends) - 1  # 0 tokens: the bare template, which fits (check_prompt_budget)
        best = prompt_ids(0)
        while too_long - fits > 1:
            mid = (fits + too_long) // 2
            ids = prompt_ids(mid)
            if len(ids) <= limit:
                fits, best = mid, ids
            else:
                too_long = mid
        return best

    @property
    def uses_chat_template(self) -> bool:
        has_template = getattr(self.tokenizer, "chat_template", None) is not None
        return self.prompt_format == "chat" or (self.prompt_format == "auto" and has_template)

    def prompt_ids(self, dialogue: str) -> list[int]:
        """Token ids of the prompt for `dialogue`: the template, through the chat template if used."""
        text = self.prompt_template.format(dialogue=dialogue)
        if not self.uses_chat_template:
            return self.tokenizer(text)["input_ids"]
        # the chat template writes the model's own special tokens; the tokenizer must not add more
        chat = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(chat, add_special_tokens=False)["input_ids"]

    def check_chat_template(self) -> None:
        """Raise a ConfigError when the chat template is wanted but missing or does not render."""
        if self.prompt_format == "chat" and getattr(self.tokenizer, "chat_template", None) is None:
            raise ConfigError("data.prompt_format='chat' but the tokenizer has no chat template; use 'plain' or 'auto'")
        if self.uses_chat_template:
            try:
                self.prompt_ids("#Person1#: Hello.")
            except Exception as err:  # jinja2 errors, template variables the message lacks, ...
                raise ConfigError(
                    f"the tokenizer's chat template does not render a user message ({type(err).__name__}: "
                    f"{' '.join(str(err).split())[:300]}); set data.prompt_format: plain"
                ) from err

    def tokenize(self, row: dict) -> dict:
        input_ids = self.fit_prompt(row["dialogue"])
        return {"input_ids": input_ids, "query": self.tokenizer.decode(input_ids, skip_special_tokens=True)}

    def collate(self, rows: list[dict]) -> dict:
        """Padded prompts plus the text columns.

        Padded on the tokenizer's side, which the policy sets from its architecture: right for T5's
        encoder, left for decoder-only models that `generate` continues (`Architecture.padding_side`).
        """
        batch = self.tokenizer.pad(
            {"input_ids": [r["input_ids"] for r in rows]},
            padding=True,
            padding_side=self.tokenizer.padding_side,
            return_tensors="pt",
        )
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        for key in ("query", "summary", "id", "dialogue", "row"):
            if key in rows[0]:
                out[key] = [r[key] for r in rows]
        return out

    def train_dataloader(self) -> DataLoader:
        # Whole batches only: every PPO iteration sees batch_size prompts. The order is fixed by
        # (seed, epoch) and the loader records its position, so a resumed run continues at the next
        # batch; the seed is the one `seed_everything` set, and a checkpoint carries it (under DDP
        # with the seed of Lightning's sampler wrapper, see `unwrap_sampler`). Rank 0's seed on
        # every rank: ranks shard one order, so without a common seed their shards overlap.
        seed = torch.initial_seed() % 2**62
        if self.trainer is not None:
            seed = int(self.trainer.strategy.broadcast(seed))
        return ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(len(self.train_dataset), seed),
            drop_last=True,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(seed),  # worker seeds; leaves the global RNG alone
        )

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=self.batch_size, collate_fn=self.collate)

    def predict_dataloader(self) -> DataLoader:
        """`predict_path`'s dialogues, or the held-out split's, in order; `row` numbers them."""
        if self.predict_dataset is None:
            if self.predict_path is not None:
                dialogues = load_dialogues(self.predict_path)
            else:
                dialogues = self.load_splits()["test"]
            self.predict_dataset = dialogues.map(lambda row, i: self.tokenize(row) | {"row": i}, with_indices=True)
        return DataLoader(self.predict_dataset, batch_size=self.batch_size, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        # The held-out split; only modules with a validation_step (the SFT stage) use it.
        return self.test_dataloader()
