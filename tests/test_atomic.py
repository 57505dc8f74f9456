"""The one atomic writer: a failure mid-write leaves the previous content, a kill during a directory
swap is recovered by the next write, and every output of the package goes through it."""

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from detox_lightning.evaluation import pictures, toxicity
from detox_lightning.evaluation.predict import PredictionWriter
from detox_lightning.io import atomic
from detox_lightning.models.policy import POLICY_ADAPTER, save_adapter
from detox_lightning.offline import builtin

PACKAGE = Path(__file__).resolve().parents[1] / "detox_lightning"


def tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


def fill_with(files: dict[str, str], fail_after: int | None = None):
    def fill(staging: Path) -> None:
        for i, (name, text) in enumerate(files.items()):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("injected: failed in the middle of the write")
            (staging / name).write_text(text)

    return fill


# ---- files ----


def test_a_failure_in_the_middle_of_a_file_write_leaves_the_previous_file(tmp_path):
    path = atomic.write_text(tmp_path / "report.json", "old")
    with pytest.raises(RuntimeError, match="injected"), atomic.atomic_file(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("injected")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temp file left


def test_a_file_write_replaces_the_file_and_creates_its_directory(tmp_path):
    path = tmp_path / "new" / "predictions.jsonl"
    atomic.write_text(path, "one\n")
    atomic.write_text(path, "two\n")
    assert path.read_text() == "two\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["predictions.jsonl"]


def test_stale_temp_files_are_found_and_removed(tmp_path):
    kept = atomic.write_text(tmp_path / "last.ckpt", "ok")
    atomic.temp_sibling(kept).write_text("a run killed while saving left this")
    atomic.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ---- directories ----


def test_a_failure_in_the_middle_of_a_directory_write_leaves_the_previous_directory(tmp_path):
    target = tmp_path / "adapter"
    atomic.write_directory(target, fill_with({"a": "old a", "b": "old b"}))
    with pytest.raises(RuntimeError, match="injected"):
        atomic.write_directory(target, fill_with({"a": "new a", "b": "new b"}, fail_after=1))
    assert tree(target) == {"a": "old a", "b": "old b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging or aside dir left


def test_a_failure_between_the_renames_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    atomic.write_directory(target, fill_with({"a": "old"}))
    rename = Path.rename

    def fail_moving_the_new_one_in(self, new):
        if Path(new) == target and Path(self).name != "adapter.old":
            raise OSError("injected: crash before the new one is in place")
        return rename(self, new)

    monkeypatch.setattr(Path, "rename", fail_moving_the_new_one_in)
    with pytest.raises(OSError, match="injected"):
        atomic.write_directory(target, fill_with({"a": "new"}))
    monkeypatch.undo()
    assert tree(target) == {"a": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize("killed", ["between the renames", "before the old one was removed"])
def test_the_next_directory_write_recovers_from_a_kill_during_the_swap(tmp_path, killed):
    target, aside = tmp_path / "adapter", tmp_path / "adapter.old"
    atomic.write_directory(target, fill_with({"a": "old"}))
    if killed == "between the renames":  # the aside copy alone: the complete one
        target.rename(aside)
        atomic.recover_directory(target)
        assert tree(target) == {"a": "old"} and not aside.exists()
        target.rename(aside)
    else:  # the new one in place, a stale aside copy beside it
        (aside).mkdir()
        (aside / "a").write_text("stale")
    atomic.write_directory(target, fill_with({"a": "new"}))
    assert tree(target) == {"a": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_fill_may_publish_a_sub_directory_of_the_staging_one(tmp_path):
    def fill(staging: Path) -> Path:
        (staging / "policy").mkdir()
        (staging / "policy" / "weights").write_text("w")
        (staging / "not published").write_text("x")
        return staging / "policy"

    atomic.write_directory(tmp_path / "adapter", fill)
    assert tree(tmp_path / "adapter") == {"weights": "w"}


def test_without_replace_a_directory_another_process_filled_is_kept(tmp_path):
    target = tmp_path / "cache"

    def fill(staging: Path) -> None:
        (staging / "mine").write_text("")
        target.mkdir()
        (target / "theirs").write_text("")

    assert atomic.write_directory(target, fill, replace=False) is False
    assert tree(target) == {"theirs": ""}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert atomic.write_directory(empty, fill_with({"a": "1"}), replace=False) is True
    assert tree(empty) == {"a": "1"}


# ---- every writer of the package uses it ----


def calls_outside_the_writer() -> list[str]:
    """Calls that write atomically by hand: fsync, rename, os.replace, temp files and directories."""
    banned_attributes = {"fsync", "rename", "mkstemp", "mkdtemp", "NamedTemporaryFile"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "io" / "atomic.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            owner = getattr(getattr(func, "value", None), "id", None)
            if name in banned_attributes or (owner == "os" and name == "replace"):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}")
    return found


def test_no_module_but_the_writer_renames_fsyncs_or_makes_temp_files():
    assert calls_outside_the_writer() == []


@pytest.fixture
def published(monkeypatch):
    """The paths the atomic writer published during the test (files and directories)."""
    paths = []
    publish_file, swap_in, _rename = atomic.publish_file, atomic._swap_in, Path.rename

    def record_file(tmp, path):
        paths.append(Path(path).name)
        publish_file(tmp, path)

    def record_swap(staged, path):
        paths.append(Path(path).name)
        swap_in(staged, path)

    monkeypatch.setattr(atomic, "publish_file", record_file)
    monkeypatch.setattr(atomic, "_swap_in", record_swap)
    monkeypatch.setattr(atomic, "fsync_tree", lambda path: (paths.append("fsync_tree"), atomic.fsync_dir(path)))
    return paths


def test_the_png_goes_through_the_writer(published, tmp_path):
    scores = {"toxicity": (np.array([0.2, 0.4]), np.array([0.1, 0.3]))}
    metrics = {"eval/toxicity_delta": -0.1, "eval/toxicity_delta_ci_low": -0.2, "eval/toxicity_delta_ci_high": 0.0}
    pictures.write_png(tmp_path / pictures.PNG_NAME, scores, metrics, "after")
    assert published == [pictures.PNG_NAME]


def test_the_table_and_the_report_go_through_the_writer(published, tmp_path):
    row = dict.fromkeys(toxicity.TABLE_COLUMNS, "x")
    toxicity.write_csv(tmp_path / "toxicity_table.csv", [row])
    assert published == ["toxicity_table.csv"]
    assert "write_text(out_dir / \"evaluation_report.json\"" in (PACKAGE / "evaluation" / "toxicity.py").read_text()
    assert toxicity.write_text is atomic.write_text


def test_predictions_go_through_the_writer(published, tmp_path):
    writer = PredictionWriter()
    writer.rows, writer.judge, writer.cap = [(0, {"dialogue": "d", "summary": "s", "toxicity": 0.5, "judge_toxicity": None})], None, 8
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), world_size=1, is_global_zero=True, datamodule=None)
    writer.on_predict_end(trainer, None)
    assert published == ["predictions.jsonl"]
    assert json.loads((tmp_path / "predictions.jsonl").read_text())["summary"] == "s"


def test_adapters_go_through_the_writer(published, tmp_path):
    class Saves:
        def save_pretrained(self, directory, **kwargs):
            directory = Path(directory) / (POLICY_ADAPTER if "selected_adapters" in kwargs else "")
            directory.mkdir(exist_ok=True)
            (directory / ("adapter_model.safetensors" if kwargs else "tokenizer.json")).write_text("")

    save_adapter(Saves(), Saves(), tmp_path / "adapter", "card")
    assert published == ["fsync_tree", "adapter"]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_model.safetensors", "tokenizer.json"]


def test_the_builtin_cache_goes_through_the_writer(published, tmp_path):
    builtin._build_atomically(tmp_path / "thing-v1", lambda path: (path / "weights").write_text(""))
    assert published == ["fsync_tree"]  # published without replacing: only if absent
    assert sorted(p.name for p in (tmp_path / "thing-v1").iterdir()) == [builtin._MARKER, "weights"]


def test_checkpoints_and_the_merged_export_go_through_the_writer():
    from detox_lightning import export
    from detox_lightning.io import checkpoint

    assert checkpoint.publish_file is atomic.publish_file and checkpoint.temp_sibling is atomic.temp_sibling
    assert export.write_directory is atomic.write_directory
