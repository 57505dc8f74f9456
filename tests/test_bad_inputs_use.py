"""Bad input to the monitor, `predict` and `export`, through the real entry points (subprocesses):
for each, a non-zero exit, one `error:` line naming the problem, no traceback, nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import write_jsonl

ROOT = Path(__file__).resolve().parents[1]

# (command, extra arguments, text the error line must contain); {name} is replaced by a path made below.
BAD_INPUTS = {
    "predict file without a dialogue column": (
        "predict", ["--data.predict_path", "{no_dialogue}"], "has no 'dialogue' column; its columns are ['text', 'topic']"
    ),
    "empty predict file": ("predict", ["--data.predict_path", "{empty}"], "empty.jsonl' is empty; expected rows with a 'dialogue' column"),
    "predict csv with a header only": ("predict", ["--data.predict_path", "{header_only}"], "header.csv' has no rows"),
    "predict with an adapter that is not a PEFT adapter": (
        "predict", ["--model.init_args.policy.adapter_name_or_path", "{not_adapter}"],
        "could not be loaded as a PEFT LoRA adapter of this base model",
    ),
    "export of a directory that is not a PEFT adapter": (
        "export", ["--adapter", "{not_adapter}", "--out", "{out}", "--merge"],
        "not_adapter' is not a PEFT adapter: it has no adapter_config.json",
    ),
    "band that is not a number": ("fit", [{"max_distinct_2_drop": "abc"}], "RolloutMonitor: max_distinct_2_drop='abc' is not a valid float"),
    "band that is nan": ("fit", [{"max_distinct_2_drop": float("nan")}], "RolloutMonitor: max_distinct_2_drop=nan is not a number"),
    "ratio above 1": ("fit", [{"max_length_change": 1.5}], "RolloutMonitor: max_length_change=1.5 must lie in (0, 1]"),
    "rollback factor of 0": ("fit", [{"action": "rollback", "rollback_factor": 0.0}], "rollback_factor=0.0 must lie in (0, 1]"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_named_error_and_nothing_is_written(case, tmp_path):
    command, args, message = BAD_INPUTS[case]
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    monitor = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("RolloutMonitor"))
    for arg in args:
        if isinstance(arg, dict):
            monitor["init_args"].update(arg)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "not_adapter").mkdir()
    (tmp_path / "not_adapter" / "notes.txt").write_text("a directory, but no adapter in it")
    (tmp_path / "header.csv").write_text("dialogue,id\n")
    files = {
        "{no_dialogue}": write_jsonl(tmp_path / "a.jsonl", [{"text": "#Person1#: hi", "topic": "x"}] * 3),
        "{empty}": write_jsonl(tmp_path / "empty.jsonl", []),
        "{header_only}": str(tmp_path / "header.csv"),
        "{not_adapter}": str(tmp_path / "not_adapter"),
        "{out}": str(tmp_path / "merged"),
    }
    args = [files.get(a, a) for a in args if not isinstance(a, dict)]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    if command == "export":
        cmd = [sys.executable, "-m", "detox_lightning.export", *args]
    else:
        cmd = [sys.executable, "train.py", command, "--config", str(tmp_path / "config.yaml"),
               "--trainer.default_root_dir", str(tmp_path / "runs"), *args]

    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ.copy(), check=False)

    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no run dir, no merged model, no temp dir
