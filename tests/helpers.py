"""Small helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

from detox_lightning import DialogSumDataModule


def fit(module, sample_data, tmp_path, iterations, callbacks=()):
    """`iterations` PPO iterations of `module` on the sample data, CSV-logged under `tmp_path`."""
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=iterations,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=pl.loggers.CSVLogger(tmp_path),
        callbacks=list(callbacks),
    )
    trainer.fit(module, DialogSumDataModule(path=sample_data, batch_size=module.batch_size))
    return trainer


def write_jsonl(path, rows):
    """`rows` as a JSON-lines file at `path`; returns the path as a string."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tensorboard_scalars(root):
    """{tag: [values]} of the first TensorBoard event file under `root`."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(Path(root).rglob("events.out.tfevents.*"))))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


ROOT = Path(__file__).resolve().parents[1]


def fit_tiny_without_evaluation(tmp_path, iterations, *overrides, timeout=900):
    """`train.py fit` on configs/tiny.yaml without its evaluation callback, logged under `tmp_path`;
    returns the TensorBoard scalars, after asserting the run succeeded."""
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "Evaluation" not in c["class_path"]]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", str(tmp_path / "config.yaml"),
         "--trainer.default_root_dir", str(tmp_path), "--trainer.limit_train_batches", str(iterations), *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tensorboard_scalars(tmp_path)


def train_cli(config, root, *args):
    """`train.py fit --config config` logged under `root`, with tests/ importable so that
    `--trainer.callbacks+=` can name a test callback; returns the finished process."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "train.py", "fit", "--config", config, "--trainer.default_root_dir", str(root), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env, check=False,
    )


def sigkill_then_resume(config, root, straight, iteration, *args, tolerance, after_kill=None):
    """`train_cli(config, root, *args)` SIGKILLed by `test_checkpointing.SigkillAfterIteration` at the
    end of `iteration`, then resumed in `root` with `--ckpt_path last`; asserts the kill, the resumed
    run's success, and that the resumed run ends with the trainable tensors of the uninterrupted run
    under `straight` (each within `tolerance`). `after_kill()`, if given, runs between the two runs.

    Returns the resumed process and the last checkpoints of the straight and the resumed run.
    """
    killed = train_cli(config, root, *args, "--trainer.callbacks+=test_checkpointing.SigkillAfterIteration",
                       f"--trainer.callbacks.iteration={iteration}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    if after_kill is not None:
        after_kill()
    resumed = train_cli(config, root, *args, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(Path(straight) / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    got = torch.load(Path(root) / "lightning_logs/version_1/checkpoints/last.ckpt", weights_only=True)
    for name, tensor in expected["state_dict"].items():
        assert (got["state_dict"][name] - tensor).abs().max() < tolerance, name
    return resumed, expected, got
