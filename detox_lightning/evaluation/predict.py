"""`python train.py predict`: summarise a file of dialogues with the trained policy, and score them.

    python train.py predict --config configs/tiny_detox.yaml --ckpt_path <run>/checkpoints/last.ckpt
    python train.py predict --config configs/tiny_detox.yaml --model.init_args.policy.adapter_name_or_path <run>/adapter_best

Lightning's predict loop hands `data.predict_path`'s prompts (default: the held-out split) batch
by batch; `PredictionWriter` samples one summary per prompt through the module's `sample` and
`decode` under a per-batch seed, as the evaluation samples, scores them as the evaluation does
(`evaluation.scoring`: on the evaluation's `text`, by the reward's classifier and the evaluation's
judge) and writes `<log_dir>/predictions.jsonl`. The writer samples rather than the module's
`predict_step` because the cap is the evaluation's, which only the callbacks know.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from detox_lightning.errors import out_of_range, raise_problems
from detox_lightning.evaluation.scoring import run_scoring, toxicity_of
from detox_lightning.io.atomic import write_text


class PredictionWriter(Callback):
    """Sample, score and write `python train.py predict`'s summaries to `<log_dir>/predictions.jsonl`.

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
        self.rows: list[tuple[int, dict]] = []
        self.cap: int | None = None  # this run's summary cap, fixed at predict start

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scoring = run_scoring(trainer)  # the ToxicityEvaluation's settings, None without one
        self.text = scoring.text if scoring is not None else pl_module.reward.text
        self.judge = scoring.judge if scoring is not None else None
        if self.judge is not None:
            self.judge.to(pl_module.device)
        cap = self.max_new_tokens or (scoring.max_new_tokens if scoring is not None else None)
        self.cap = cap or pl_module.generation.output_max_length
        self.rows = []

    @torch.no_grad()
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        torch.manual_seed(self.seed + batch_idx)
        samples = pl_module.sample(batch["input_ids"], batch["attention_mask"], self.cap)
        queries, summaries = batch["query"], pl_module.decode(samples.response_ids)
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
        path = write_text(
            Path(log_dir or trainer.default_root_dir) / self.filename,
            "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines),
        )
        source = trainer.datamodule.predict_path if trainer.datamodule is not None else None
        mean = sum(line["toxicity"] for line in lines) / len(lines)
        judge = ""
        if self.judge is not None:
            judge = f", judge {sum(line['judge_toxicity'] for line in lines) / len(lines):.4f}"
        rank_zero_info(
            f"predict: {len(lines)} summaries of {source or 'the held-out split'} (seed {self.seed}, "
            f"at most {self.cap} tokens); mean toxicity {mean:.4f}{judge}; wrote {path}"
        )


def add_prediction_writer(trainer: pl.Trainer) -> None:
    """Give `trainer` a `PredictionWriter` unless the config has one."""
    if not any(isinstance(c, PredictionWriter) for c in trainer.callbacks):
        trainer.callbacks.append(PredictionWriter())
