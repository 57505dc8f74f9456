"""The one way this package writes a file or a directory that must survive a kill: write beside
the target, fsync, rename.

A rename within one directory is atomic on POSIX file systems, so a reader (or the next run, after
a SIGKILL or a power loss) sees the old content or the new one, never a part of either. The data
is fsync'ed before the rename that publishes it and the directory after it, or a power loss could
publish a name whose data never reached the disk.

Files are swapped in with one `os.replace`. A directory cannot be replaced by a rename while it
has entries, so it takes two: the old one moves aside to `<name>.old`, the new one moves in, the
old one is deleted. Between the two renames `<name>.old` is the only complete copy; the next write
to `<name>` puts it back first (`recover_directory`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"
ASIDE_SUFFIX = ".old"


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so that renames and new entries in it survive a power loss (POSIX only)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under `path` and every directory, `path` included: all of it is on disk."""
    path = Path(path)
    for item in sorted(path.rglob("*"), reverse=True):  # entries before the directories that hold them
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
        elif item.is_dir():
            fsync_dir(item)
    fsync_dir(path)


# ---- files ----


def temp_sibling(path: str | os.PathLike) -> Path:
    """Where `path` is written before it is renamed into place: `.<name>.tmp` in the same directory.

    The same directory, so the rename never crosses file systems (where it would be a copy); a
    fixed name, so every rank of a distributed run names the same file and a run killed while
    writing leaves one file that `remove_stale_temps` finds.
    """
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


def publish_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync `tmp`, rename it over `path`, fsync the directory: `path` is the old or the new file."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the temp path to write; on a clean exit it replaces `path`, on an error it is removed.

    For writers that want a path rather than a string (`Figure.savefig`, `csv`, `torch.save`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        publish_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after a publish; a part of a file after an error


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def remove_stale_temps(directory: str | os.PathLike) -> None:
    """Delete the temp files (`temp_sibling`) a run killed while writing left in `directory`."""
    for stale in Path(directory).glob(f".*{TMP_SUFFIX}"):
        if stale.is_file():
            stale.unlink(missing_ok=True)


# ---- directories ----


def recover_directory(path: str | os.PathLike) -> None:
    """Undo what a kill during a directory swap left: `<path>.old` alone is the complete copy and
    goes back; beside a `path` it is a stale copy (killed before its deletion) and goes."""
    path = Path(path)
    aside = path.with_name(path.name + ASIDE_SUFFIX)
    if aside.exists():
        if path.exists():
            shutil.rmtree(aside)
        else:
            aside.rename(path)


def write_directory(
    path: str | os.PathLike, fill: Callable[[Path], Path | None], replace: bool = True
) -> bool:
    """Build a directory with `fill` beside `path`, fsync it, and rename it into place.

    Args:
        path: the directory to write.
        fill: writes the content into the empty staging directory it is given; returns None, or
            the sub-directory of it to publish (peft saves a named adapter in a sub-folder).
        replace: True: swap out what `path` holds (one complete copy at every instant, see the
            module docstring). False: publish only where `path` does not exist or is empty; when
            another process filled it meanwhile (e.g. another rank building the same cache),
            theirs is kept and ours discarded.

    Returns:
        whether `path` now holds what `fill` wrote (always True with `replace`).

    An error in `fill` leaves `path` as it was and removes the staging directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        recover_directory(path)
    # mkdtemp's own directory is private (0700); the one published is made with the usual mode
    holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        staging = holder / path.name
        staging.mkdir()
        staged = fill(staging) or staging
        fsync_tree(staged)  # the files' data before the renames that publish them
        if replace:
            _swap_in(staged, path)
            return True
        try:
            staged.rename(path)  # POSIX: succeeds over an empty directory, fails over a filled one
        except OSError:
            if path.is_dir() and any(path.iterdir()):
                return False
            raise
        fsync_dir(path.parent)
        return True
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def _swap_in(staged: Path, path: Path) -> None:
    """Move `path` aside, `staged` in, delete the old one; an error between the renames puts it back."""
    aside = path.with_name(path.name + ASIDE_SUFFIX)
    if path.exists():
        path.rename(aside)
    try:
        staged.rename(path)
    except BaseException:
        if aside.exists() and not path.exists():
            aside.rename(path)
        raise
    fsync_dir(path.parent)  # the renames themselves
    shutil.rmtree(aside, ignore_errors=True)
