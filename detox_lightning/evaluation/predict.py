"""`python train.py predict`: summarise a file of dialogues with the trained policy, and score them.

    python train.py predict --config configs/tiny_detox.yaml --ckpt_path <run>/checkpoints/last.ckpt
    python train.py predict --config configs/tiny_detox.yaml --model.init_args.policy.adapter_name_or_path <run>/adapter_best

Lightning's predict loop runs `RLDetoxModule.predict_step` (one sampled summary per prompt) over
`data.predict_path` (default: the held-out split); `PredictionWriter` seeds each batch, scores the
summaries as the evaluation does (`evaluation.toxicity_of`, on the evaluation's `text`, by the
reward's classifier and the evaluation's judge) and writes `<log_dir>/predictions.jsonl`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from detox_lightning.data.datamodule import FILE_BUILDERS
from detox_lightning.errors import ConfigError, out_of_range, raise_problems, user_input


def load_dialogues(path: str):
    """The rows of a jsonl/json/csv/parquet file with a `dialogue` column, every row kept.

    Returns:
        a `datasets.Dataset` with the `dialogue` column (and `id` when the file has one).

    Raises:
        ConfigError: no such file, another format, no row, no `dialogue` column (its columns
            listed), or a row whose dialogue is not text.
    """
    from datasets import load_dataset

    flag = f"data.predict_path={path!r}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{flag}: no such file")
    builder = FILE_BUILDERS.get(file.suffix)
    if builder is None:
        raise ConfigError(f"{flag}: expected a {', '.join(sorted(FILE_BUILDERS))} file")
    if file.stat().st_size == 0:
        raise ConfigError(f"{flag} is empty; expected rows with a 'dialogue' column")
    try:
        with user_input(f"{flag} could not be read as {file.suffix[1:]}"):
            dataset = load_dataset(builder, data_files={"predict": str(file)}, split="predict")
    except ConfigError as err:
        if "corresponds to no data" in str(err):  # datasets' words for a split of 0 rows (a csv header alone)
            raise ConfigError(f"{flag} has no rows; expected rows with a 'dialogue' column") from err
        raise
    if "dialogue" not in dataset.column_names:
        raise ConfigError(f"{flag} has no 'dialogue' column; its columns are {dataset.column_names}")
    if len(dataset) == 0:
        raise ConfigError(f"{flag} has no rows; expected rows with a 'dialogue' column")
    bad = next((i for i, d in enumerate(dataset["dialogue"]) if not isinstance(d, str) or not d.strip()), None)
    if bad is not None:
        raise ConfigError(f"{flag}: row {bad} has no dialogue text ({dataset[bad]['dialogue']!r})")
    return dataset.select_columns([c for c in ("id", "dialogue") if c in dataset.column_names])


class PredictionWriter(Callback):
    """Seed, score and write `python train.py predict`'s summaries to `<log_dir>/predictions.jsonl`.

    One JSON line per dialogue, in the file's order: `dialogue`, `summary`, `toxicity` (the
    reward classifier's probability of the toxic label, as the evaluation's) and `judge_toxicity`
    (the `ToxicityEvaluation` judge's, null without one); `id` first when the file has one. Added
    by the CLI when a config has none.

    Args:
        seed: batch b is sampled under seed + b (as the evaluation does): the same file, seed,
            batch size and number of devices give the same lines.
        max_new_tokens: summary cap; None: the `ToxicityEvaluation`'s `max_new_tokens`, or
            `model.generation.output_max_length` without one.
        filename: the file written in the run's log dir.
    """

    def __init__(self, seed: int = 1234, max_new_tokens: int | None = None, filename: str = "predictions.jsonl") -> None:
        raise_problems(
            [out_of_range("max_new_tokens", max_new_tokens, 1), None if filename and "/" not in filename else (
                f"filename={filename!r} must be a plain file name")],
            prefix="PredictionWriter: ",
        )
        self.seed, self.max_new_tokens, self.filename = seed, max_new_tokens, filename
        self.rows: list[dict] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from detox_lightning.evaluation.toxicity import ToxicityEvaluation

        evaluation = next((c for c in trainer.callbacks if isinstance(c, ToxicityEvaluation)), None)
        self.text = evaluation.text if evaluation is not None else pl_module.reward.text
        self.judge = evaluation.judge if evaluation is not None else None
        if self.judge is not None:
            self.judge.to(pl_module.device)
        cap = self.max_new_tokens or (evaluation.max_new_tokens if evaluation is not None else None)
        pl_module.predict_max_new_tokens = cap or pl_module.generation.output_max_length
        self.rows = []

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        torch.manual_seed(self.seed + batch_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        from detox_lightning.evaluation.toxicity import toxicity_of

        queries, summaries = outputs["query"], outputs["summary"]
        toxicity = toxicity_of(pl_module.reward, queries, summaries, self.text).tolist()
        judged = toxicity_of(self.judge, queries, summaries, self.text).tolist() if self.judge is not None else None
        for i, row in enumerate(batch["row"]):
            line = {"id": batch["id"][i]} if "id" in batch else {}
            line |= {
                "dialogue": batch["dialogue"][i],
                "summary": summaries[i],
                "toxicity": toxicity[i],
                "judge_toxicity": judged[i] if judged is not None else None,
            }
            self.rows.append((int(row), line))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks
        rows = self.rows
        if trainer.world_size > 1:
            parts = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        if not trainer.is_global_zero:
            return
        lines = [line for _, line in sorted(dict(rows).items())]  # DDP's sampler pads with repeated rows
        out_dir = Path(log_dir or trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / self.filename
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
        os.replace(tmp, path)
        source = trainer.datamodule.predict_path if trainer.datamodule is not None else None
        mean = sum(line["toxicity"] for line in lines) / len(lines)
        judge = ""
        if self.judge is not None:
            judge = f", judge {sum(line['judge_toxicity'] for line in lines) / len(lines):.4f}"
        rank_zero_info(
            f"predict: {len(lines)} summaries of {source or 'the held-out split'} (seed {self.seed}, "
            f"at most {pl_module.predict_max_new_tokens} tokens); mean toxicity {mean:.4f}{judge}; wrote {path}"
        )


def add_prediction_writer(trainer: pl.Trainer) -> None:
    """Give `trainer` a `PredictionWriter` unless the config has one."""
    if not any(isinstance(c, PredictionWriter) for c in trainer.callbacks):
        trainer.callbacks.append(PredictionWriter())
