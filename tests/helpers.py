"""Small helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

import json

import lightning.pytorch as pl

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
