"""Writing what the library saves so that nothing is lost: no file the library did not
write is ever replaced or deleted, and a crash at any moment leaves either the old or the
new version complete.

A directory of files (a LoRI adapter, a PEFT export, a training checkpoint, a merged
model) is written in place by ``write_directory``:

1. ``recover``: finish or discard what an interrupted write left behind (below);
2. refuse a path that is a file, or a directory holding anything the writer does not
   own (the writer's own file names, e.g. ``lori_config.json`` and
   ``adapter.safetensors``): other files, subdirectories, another kind of adapter;
3. write each new file under a temporary name beside its final one
   (``.<name>.<random>.lori-tmp``) and fsync it;
4. commit: write the journal ``.lori-commit.json`` (temporary name -> final name), itself
   through a temporary file renamed into place;
5. rename each temporary file onto its final name, fsync the directory, delete the journal.

A crash before 4 leaves the old files untouched (the next writer deletes the
temporaries); a crash after 4 leaves a journal that ``recover`` completes (a rename
already done is skipped). Every reader of the library calls ``recover`` first, so it
reads the old files or the new ones, never a mix. Two processes must not write the same
directory at once; under torch.distributed only rank 0 writes (``is_writer``).

Single files (masks) are written by ``atomic_file``: a temporary beside the target,
renamed over it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from lori.errors import CheckpointError, OutputError

__all__ = [
    "TMP_SUFFIX",
    "DirectoryWriter",
    "atomic_file",
    "check_output_dir",
    "check_output_file",
    "is_writer",
    "read_json",
    "recover",
    "remove_written",
    "write_directory",
]

TMP_SUFFIX = ".lori-tmp"
JOURNAL = ".lori-commit.json"


def _temporary(directory: Path, name: str) -> Path:
    return directory / f".{name}.{secrets.token_hex(6)}{TMP_SUFFIX}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finish(tmp: Path) -> None:
    """A written temporary file made durable, with a new file's usual mode (safetensors
    creates its files private)."""
    os.chmod(tmp, 0o666 & ~_umask())
    _fsync(tmp)


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ownership(owned: Collection[str] | Callable[[str], bool]) -> Callable[[str], bool]:
    return owned if callable(owned) else frozenset(owned).__contains__


class DirectoryWriter:
    """The files of one write into ``directory``, under temporary names until ``commit``."""

    def __init__(self, directory: Path, owns: Callable[[str], bool]):
        self.directory = directory
        self.owns = owns
        self.moves: dict[str, str] = {}  # temporary path relative to directory -> final name
        self.staging: list[Path] = []
        self.committed = False

    def file(self, name: str) -> Path:
        """Where to write the file that becomes ``directory/name``."""
        if not self.owns(name) or name in self.moves.values():
            raise ValueError(f"a {name!r} cannot be written here twice or by this writer")
        tmp = _temporary(self.directory, name)
        self.moves[tmp.name] = name
        return tmp

    def staging_dir(self) -> Path:
        """A temporary directory (for writers such as ``save_pretrained``) whose files
        all become files of ``directory`` at commit."""
        stage = _temporary(self.directory, "staging")
        stage.mkdir()
        self.staging.append(stage)
        return stage

    def commit(self) -> None:
        for stage in self.staging:
            for f in sorted(stage.iterdir()):
                if not f.is_file() or not self.owns(f.name) or f.name in self.moves.values():
                    raise OutputError(f"{self.directory}: the writer produced an unexpected {f.name!r}")
                self.moves[f"{stage.name}/{f.name}"] = f.name
        for tmp in self.moves:
            _finish(self.directory / tmp)
        finals = set(self.moves.values())
        stale = sorted(n for n in os.listdir(self.directory) if self.owns(n) and n not in finals)
        with atomic_file(self.directory / JOURNAL) as journal:
            journal.write_text(json.dumps({"moves": sorted(self.moves.items()), "remove": stale}))
        self.committed = True  # from here on, recover() completes the write whatever happens
        _apply_journal(self.directory, clean=True)

    def discard(self) -> None:
        if self.committed:
            return
        for tmp in [*self.moves, *(s.name for s in self.staging)]:
            _remove_temporary(self.directory / tmp)


def _remove_temporary(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _apply_journal(directory: Path, clean: bool) -> None:
    journal = directory / JOURNAL
    try:
        entries = json.loads(journal.read_text())
        moves, remove = entries["moves"], entries["remove"]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{journal} (an interrupted write's journal) is unreadable: {e}") from None
    for tmp, final in moves:
        with contextlib.suppress(FileNotFoundError):  # renamed already (by us before a crash, or by a reader)
            os.replace(directory / tmp, directory / final)
    if clean:
        for name in remove:
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
    _fsync(directory)
    with contextlib.suppress(FileNotFoundError):
        journal.unlink()
    for tmp, _ in moves:
        if "/" in tmp:
            with contextlib.suppress(OSError):
                (directory / tmp).parent.rmdir()


def recover(directory: str | os.PathLike, *, clean: bool = False) -> None:
    """Complete a committed write that a crash interrupted (readers and writers); with
    ``clean`` (writers only) also delete the temporaries of writes that never committed
    and the owned files a committed write dropped."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    try:
        _apply_journal(directory, clean)
        if clean:
            for entry in directory.iterdir():
                if entry.name.endswith(TMP_SUFFIX):
                    _remove_temporary(entry)
    except OSError as e:
        raise OutputError(f"cannot complete an interrupted write in {directory}: {e.strerror or e}") from None


def check_output_dir(
    path: str | os.PathLike, owned: Collection[str] | Callable[[str], bool], *, what: str, keep_others: bool = False
) -> None:
    """Refuse, before anything is written, a ``path`` that ``write_directory`` would
    refuse: a file, or (unless ``keep_others``) a directory holding entries that ``owned``
    does not name (temporaries of interrupted writes do not count)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} exists and is not a directory; the {what} is a directory")
    if keep_others or not path.is_dir():
        return
    owns = _ownership(owned)
    try:
        foreign = sorted(n for n in os.listdir(path) if not (owns(n) or n.endswith(TMP_SUFFIX) or n == JOURNAL))
    except OSError as e:
        raise OutputError(f"cannot write the {what} to {path}: {e.strerror or e}") from None
    if foreign:
        listed = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise OutputError(
            f"{path} holds files that are not a {what}'s ({listed}); nothing was written: choose a new or "
            "empty directory"
        )


@contextlib.contextmanager
def write_directory(
    path: str | os.PathLike, owned: Collection[str] | Callable[[str], bool], *, what: str, keep_others: bool = False
) -> Iterator[DirectoryWriter]:
    """Write files into the directory ``path`` (created if missing) as described in the
    module docstring: yields a ``DirectoryWriter``; its files replace the old ones when
    the block ends without error. ``owned``: the file names this writer may replace
    (names, or a predicate); any other entry in ``path`` makes it refuse
    (``check_output_dir``), unless ``keep_others``: then they stay as they are (PEFT's
    ``save_pretrained`` writing into a Trainer's output directory). ``what`` names the
    thing written in messages."""
    path = Path(path)
    check_output_dir(path, owned, what=what, keep_others=keep_others)
    try:
        path.mkdir(parents=True, exist_ok=True)
        recover(path, clean=True)
    except OSError as e:
        raise OutputError(f"cannot write the {what} to {path}: {e.strerror or e}") from None
    writer = DirectoryWriter(path, _ownership(owned))
    try:
        yield writer
        writer.commit()
    except BaseException as e:
        writer.discard()
        if isinstance(e, OSError):
            raise OutputError(f"cannot write the {what} to {path}: {e.strerror or e}; the old one is unchanged") from e
        raise


def remove_written(path: str | os.PathLike, owned: Collection[str] | Callable[[str], bool]) -> bool:
    """Delete what ``write_directory`` wrote into ``path`` (the ``owned`` files and any
    temporaries), then the directory itself if that left it empty; returns whether it is
    gone. Nothing else in it is touched."""
    path = Path(path)
    recover(path, clean=True)
    owns = _ownership(owned)
    for entry in path.iterdir():
        if owns(entry.name) and entry.is_file():
            entry.unlink()
    try:
        path.rmdir()
    except OSError:
        return False
    return True


def check_output_file(path: str | os.PathLike) -> None:
    """Refuse, before anything is written, a ``path`` that ``atomic_file`` would refuse."""
    if Path(path).is_dir():
        raise OutputError(f"{path} is a directory; give the name of a file to write")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside the file ``path``; on success it is fsynced and
    renamed onto ``path`` (replacing an old file), on error removed. Temporaries of
    earlier interrupted writes of the same file are deleted first."""
    path = Path(path)
    check_output_file(path)
    prefix = f".{path.name}."
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.iterdir():
            if stale.name.startswith(prefix) and stale.name.endswith(TMP_SUFFIX):
                _remove_temporary(stale)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    tmp = _temporary(path.parent, path.name)
    try:
        yield tmp
        _finish(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}; an old file there is unchanged") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_json(path: Path, what: str):
    """The JSON value in ``path``, or a ``CheckpointError`` naming the file (missing,
    unreadable, not UTF-8, not JSON, nested too deeply)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} is not a {what}: {path.name} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path} is not a {what}'s JSON: it is nested too deeply") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def is_writer() -> bool:
    """Whether this process writes files: the only one, or rank 0 of a process group."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
