"""Local data files: which `datasets` builder reads which suffix, where a `data.path` points, and
the dialogues `python train.py predict` summarises.

Kept apart from the DataModule so that the prediction writer (evaluation) reads its file the way
the data reads its own, without the data layer ever importing the evaluation.
"""

from __future__ import annotations

from pathlib import Path

from detox_lightning.errors import ConfigError, user_input

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def data_files(path: str | dict[str, str]) -> tuple[str, dict[str, str]] | None:
    """(builder, {split: file}) for local data; None for a hub id.

    A directory is read as `<split>.<ext>` files; a single file is the `train` split.
    """
    if isinstance(path, dict):
        files = {split: str(Path(f).expanduser()) for split, f in path.items()}
    else:
        p = Path(path).expanduser()
        if p.is_dir():
            files = {f.stem: str(f) for f in sorted(p.iterdir()) if f.suffix in FILE_BUILDERS}
            if not files:
                raise ConfigError(f"data.path={path!r} is a directory without {sorted(FILE_BUILDERS)} files")
        elif p.suffix in FILE_BUILDERS or p.exists() or path.startswith((".", "/", "~")):
            files = {"train": str(p)}
        else:
            return None  # owner/name: a hub dataset
    missing = [f for f in files.values() if not Path(f).is_file()]
    if missing:
        raise ConfigError(f"data.path: no such data file {missing[0]!r}")
    suffixes = {Path(f).suffix for f in files.values()}
    unknown = suffixes - set(FILE_BUILDERS)
    if unknown or len(suffixes) != 1:
        raise ConfigError(f"data.path: files must share one of the formats {sorted(FILE_BUILDERS)}, got {sorted(suffixes)}")
    return FILE_BUILDERS[suffixes.pop()], files


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
