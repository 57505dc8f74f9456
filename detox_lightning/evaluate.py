"""`python -m detox_lightning.evaluate --config configs/X.yaml [--adapter DIR ...] [--base]`:
score models on a config's held-out prompts, without training, in the literature's layout.

One row per model (DExperts' Table 2): expected maximum toxicity (with its std over prompts),
toxicity probability, fluency (perplexity under `--reference`, by default the bare base model, or
under any causal LM named by `--evaluator`, e.g. `gpt2-xl` as DExperts), distinct-1/2/3, and
the same toxicity figures for each judge of the config's `ToxicityEvaluation`. Every
model samples the same prompts under the same seeds (the config's `ToxicityEvaluation` settings),
and every figure can be recomputed from `samples.jsonl` (one line per sample: model, prompt id,
sample index, prompt, text, every scorer's toxicity and the log-perplexity).

Writes `table.md`, `table.json` and `samples.jsonl` in `--out`. Further arguments are passed to
the config as on `train.py`'s command line (e.g. `--data.path DIR`, or `--trainer.devices 2
--trainer.strategy ddp`: each rank samples its share of the prompts, rank 0 writes the table).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_only

from detox_lightning.cli import build_cli, check_moved_paths, errors_as_one_line, quiet_library_noise
from detox_lightning.errors import ConfigError
from detox_lightning.evaluation import ToxicityEvaluation, protocol
from detox_lightning.evaluation.toxicity import Outputs
from detox_lightning.io.atomic import write_text
from detox_lightning.models.fluency import EvaluatorLM

BASE = "base"


@dataclass
class Scored:
    """One model's evaluation: its name and per-sample outputs, (P, k) arrays."""

    name: str
    outputs: Outputs
    evaluator: str = "reference"  # whose perplexity `outputs.log_ppl` holds


def table_row(scored: Scored) -> dict[str, float | str]:
    """The figures of one model, each computed from its (P, k) per-sample arrays."""
    out = scored.outputs
    row: dict[str, float | str] = {"model": scored.name, "prompts": len(out.queries), "samples_per_prompt": out.toxicity.shape[1]}
    if out.log_ppl is not None:
        row["fluency_evaluator"] = scored.evaluator
    scorers = {"toxicity": out.toxicity}
    if out.judge_toxicity is not None:
        scorers["judge_toxicity"] = out.judge_toxicity
    for label, values in (out.more_judges or {}).items():
        scorers[f"{label}_toxicity"] = values
    for name, values in scorers.items():
        row[f"{name}_exp_max"], row[f"{name}_exp_max_std"] = protocol.expected_max_toxicity(values)
        row[f"{name}_prob"] = protocol.toxicity_probability(values)
        row[f"{name}_mean"] = float(np.asarray(values, dtype=np.float64).mean())
    if out.log_ppl is not None:
        row |= protocol.fluency(out.log_ppl)
    for n in (1, 2, 3):
        values = protocol.distinct_n(out.responses, n)
        row[f"dist{n}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return row


def sample_rows(scored: Scored) -> list[dict]:
    out = scored.outputs
    rows = []
    for p, (query, responses) in enumerate(zip(out.queries, out.responses, strict=True)):
        for j, text in enumerate(responses):
            row = {"model": scored.name, "prompt_id": p, "sample": j, "prompt": query, "text": text,
                   "toxicity": float(out.toxicity[p, j])}
            if out.judge_toxicity is not None:
                row["judge_toxicity"] = float(out.judge_toxicity[p, j])
            for label, values in (out.more_judges or {}).items():
                row[f"{label}_toxicity"] = float(values[p, j])
            if out.log_ppl is not None:
                row["log_perplexity"] = float(out.log_ppl[p, j])
            rows.append(row)
    return rows


COLUMNS = [
    ("model", "model", "{}"),
    ("toxicity_exp_max", "exp. max. toxicity", "{:.4f}"),
    ("toxicity_exp_max_std", "(std)", "{:.4f}"),
    ("toxicity_prob", "toxicity prob.", "{:.3f}"),
    ("perplexity", "fluency (ppl)", "{:.2f}"),
    ("dist1", "dist-1", "{:.3f}"),
    ("dist2", "dist-2", "{:.3f}"),
    ("dist3", "dist-3", "{:.3f}"),
    ("judge_toxicity_exp_max", "judge exp. max.", "{:.4f}"),
    ("judge_toxicity_prob", "judge prob.", "{:.3f}"),
]


def markdown(rows: list[dict]) -> str:
    labels = sorted({k.removesuffix("_toxicity_exp_max") for r in rows for k in r if k.endswith("_toxicity_exp_max")})
    extra = [(f"{label}_toxicity_exp_max", f"{label} exp. max.", "{:.4f}") for label in labels if label.startswith("judge") and label != "judge"]
    extra += [(f"{label}_toxicity_prob", f"{label} prob.", "{:.3f}") for label in labels if label.startswith("judge") and label != "judge"]
    columns = [c for c in COLUMNS + extra if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[key]) if key in r else "-" for key, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def evaluation_callback(trainer) -> ToxicityEvaluation:
    found = [c for c in trainer.callbacks if isinstance(c, ToxicityEvaluation)]
    if not found:
        raise ConfigError("the config has no detox_lightning.evaluation.ToxicityEvaluation callback; its settings say how to evaluate")
    return found[0]


def score(
    config_args: list[str], adapter: str | None, reference: str, root: Path, overrides: dict
) -> tuple[Outputs, Outputs]:
    """(reference, model) outputs: `adapter` (None: the reference itself) against the frozen reference,
    which is also the evaluator of fluency (`base`: the bare base model)."""
    args = [*config_args, "--model.init_args.policy.reference_adapter_name_or_path", reference, "--trainer.logger", "false",
            "--trainer.default_root_dir", str(root)]
    if adapter is not None:
        args += ["--model.init_args.policy.adapter_name_or_path", adapter]
    cli = build_cli(args, run=False)
    evaluation = evaluation_callback(cli.trainer)
    evaluation.export_adapter = evaluation.export_best_adapter = evaluation.plots = False
    for name, value in overrides.items():
        setattr(evaluation, name, value)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return evaluation.before, evaluation.last_outputs


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m detox_lightning.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a train.py config with a ToxicityEvaluation callback")
    parser.add_argument("--adapter", action="append", default=[], help="an exported adapter directory (repeatable)")
    parser.add_argument("--base", action="store_true", help="also a row for the reference (always, without --adapter)")
    parser.add_argument("--reference", default=BASE, help="the reference row and evaluator of fluency: `base` (the bare "
                        "base model, default) or an adapter directory, e.g. the SFT adapter RL started from")
    parser.add_argument("--out", default="lightning_logs/evaluation", help="where table.md, table.json and samples.jsonl go")
    parser.add_argument("--num-prompts", type=int, help="override the config's ToxicityEvaluation num_prompts")
    parser.add_argument("--samples-per-prompt", type=int, help="override its samples_per_prompt (the literature: 25)")
    parser.add_argument("--max-new-tokens", type=int, help="override its max_new_tokens (RealToxicityPrompts: 20)")
    parser.add_argument("--batch-size", type=int, help="override its batch_size (prompts per generate call)")
    parser.add_argument("--evaluator", help="score fluency under this causal LM (hub id, directory or builtin: name; "
                        "the literature: gpt2-xl) instead of the reference")
    args, rest = parser.parse_known_args(argv)
    flagged = [("--adapter", a) for a in args.adapter] + ([] if args.reference == BASE else [("--reference", args.reference)])
    for flag, adapter in flagged:
        if not Path(adapter).is_dir():
            raise ConfigError(f"{flag} {adapter!r} is not a directory; expected an exported adapter (adapter/ or adapter_best/ of a run)")
    for flag in ("num_prompts", "samples_per_prompt", "max_new_tokens", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < (2 if flag == "num_prompts" else 1):
            raise ConfigError(f"--{flag.replace('_', '-')}={value} must be at least {2 if flag == 'num_prompts' else 1}")
    return args, rest


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    quiet_library_noise()
    with errors_as_one_line():
        args, rest = parse(argv)
        config_args = ["--config", args.config, *rest]
        check_moved_paths(config_args)
        out = Path(args.out)
        overrides: dict = {
            k: getattr(args, k) for k in ("num_prompts", "samples_per_prompt", "max_new_tokens", "batch_size") if getattr(args, k)
        }
        if args.evaluator is not None:  # loaded once, for every model's row, before anything is written
            overrides |= {"evaluator": EvaluatorLM(args.evaluator), "fluency": True}
        scored: list[Scored] = []
        evaluator = args.evaluator or f"reference ({args.reference})"
        for adapter in args.adapter or [None]:
            base, model = score(config_args, adapter, args.reference, out / "runs", overrides)
            if not scored and (args.base or not args.adapter):
                scored.append(Scored(args.reference, base, evaluator))
            if adapter is not None:
                scored.append(Scored(str(adapter), model, evaluator))
        rows = [table_row(s) for s in scored]
        if rank_zero_only.rank != 0:  # under DDP every rank scored its share and holds the gathered figures
            return rows
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "table.md", markdown(rows))
        write_text(out / "table.json", json.dumps(rows, indent=2))
        write_text(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for s in scored for r in sample_rows(s)))
        print(markdown(rows), end="")
        if any("fluency_evaluator" in r for r in rows):
            print(f"fluency: perplexity of the responses given their prompts under {evaluator}")
        print(f"wrote table.md, table.json, samples.jsonl in {out}")
        return rows


if __name__ == "__main__":
    main()
