"""Writing adapters without losing anything: only owned files are replaced, foreign ones
refuse the write, and a crash at any point (emulated at every file-system step, and by
SIGKILL of a real process) leaves the old or the new adapter complete."""

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_model import randomize_b, tiny_model

import lori
from lori import LoRIConfig
from lori.checkpoint import read_lori, save_lori
from lori.errors import OutputError
from lori.files import JOURNAL, TMP_SUFFIX, atomic_file, recover, write_directory
from lori.peft_interop import export_peft


def adapter(seed):
    model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 8), seed=3))
    randomize_b(model, seed=seed)
    return model


def b_values(path):
    return {name: t["b_values"] for name, t in read_lori(path)[1].items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(TMP_SUFFIX) or p.name == JOURNAL)


def test_saving_into_a_directory_with_other_files_is_refused_and_touches_nothing(tmp_path):
    """The export of run/adapter into run/ itself once deleted run/: now refused, run/ intact."""
    run = tmp_path / "run"
    save_lori(adapter(1), run / "adapter")
    (run / "notes.txt").write_text("mine")
    before, values = sorted(p.relative_to(run) for p in run.rglob("*")), b_values(run / "adapter")
    for write in (lambda: save_lori(adapter(2), run), lambda: export_peft(adapter(2), run)):
        with pytest.raises(OutputError, match=r"run holds files that are not a .*(adapter, notes.txt)"):
            write()
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert (run / "notes.txt").read_text() == "mine"
    assert same(b_values(run / "adapter"), values)


def test_a_lori_adapter_and_a_peft_adapter_do_not_overwrite_each_other(tmp_path):
    save_lori(adapter(1), tmp_path / "a")
    with pytest.raises(OutputError, match="not a PEFT adapter's"):
        export_peft(adapter(1), tmp_path / "a")
    export_peft(adapter(1), tmp_path / "p")
    with pytest.raises(OutputError, match="not a LoRI adapter's"):
        save_lori(adapter(1), tmp_path / "p")


def test_saving_onto_a_file_is_refused_before_anything_is_written(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("a file of the user's")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        save_lori(adapter(1), target)
    assert target.read_text() == "a file of the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_saving_replaces_only_the_owned_files_in_place(tmp_path):
    path = tmp_path / "adapter"
    save_lori(adapter(1), path)
    inode = path.stat().st_ino
    save_lori(adapter(2), path)
    assert path.stat().st_ino == inode  # the directory itself is never moved or deleted
    assert same(b_values(path), b_values(save_lori(adapter(2), tmp_path / "fresh")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "fresh"]


def test_an_unwritable_output_is_one_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "dev-full"  # root ignores permissions: a path under a file instead
        target.write_text("")
        path = target / "adapter"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        path = locked / "adapter"
    with pytest.raises(OutputError, match=f"cannot write the LoRI adapter to {path}"):
        save_lori(adapter(1), path)


def test_masks_output_that_is_a_directory(tmp_path):
    model = adapter(1)
    with pytest.raises(OutputError, match="is a directory; give the name of a file"):
        lori.save_masks(lori.extract_masks(model, 0.5), tmp_path)


class Crash(BaseException):
    """A process death: raised by the k-th file-system step and every step after it."""


@contextlib.contextmanager
def crash_at(k, monkeypatch):
    """Make the ``k``-th mutating file-system call (rename, fsync, chmod, unlink, rmdir,
    rmtree) and every later one raise ``Crash``: what is on disk then is what a SIGKILL
    at that moment leaves. Yields a list that receives the number of calls made."""
    calls = [0]
    with monkeypatch.context() as m:
        for module, name in [(os, "replace"), (os, "fsync"), (os, "chmod"), (os, "unlink"), (os, "rmdir"),
                             (shutil, "rmtree")]:  # fmt: skip
            real = getattr(module, name)

            def step(*args, _real=real, **kwargs):
                calls[0] += 1
                if calls[0] > k:
                    raise Crash
                return _real(*args, **kwargs)

            m.setattr(module, name, step)
        yield calls


def test_a_crash_at_any_step_of_a_save_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch):
    old, new = adapter(1), adapter(2)
    reference = tmp_path / "reference"
    save_lori(old, reference / "old")
    save_lori(new, reference / "new")
    want_old, want_new = b_values(reference / "old"), b_values(reference / "new")
    with crash_at(10**9, monkeypatch) as calls:
        save_lori(new, tmp_path / "count")
    seen = set()
    for k in range(calls[0] + 1):
        path = tmp_path / f"k{k}"
        shutil.copytree(reference / "old", path)
        with crash_at(k, monkeypatch), contextlib.suppress(Crash):
            save_lori(new, path)
        got = b_values(path)  # a reader completes a committed write first
        assert same(got, want_old) or same(got, want_new), f"crash at step {k}: neither adapter"
        seen.add("old" if same(got, want_old) else "new")
        save_lori(old, path)  # the next writer cleans what the crash left
        assert leftovers(path) == [] and same(b_values(path), want_old)
    assert seen == {"old", "new"}


def test_a_crash_while_writing_masks_keeps_the_old_file(tmp_path, monkeypatch):
    model = adapter(1)
    path = tmp_path / "masks.safetensors"
    lori.save_masks(lori.extract_masks(model, 0.5), path)
    old = path.read_bytes()
    for k in range(3):
        with crash_at(k, monkeypatch), contextlib.suppress(Crash):
            lori.save_masks(lori.extract_masks(model, 0.75), path)
        assert path.read_bytes() == old
    lori.save_masks(lori.extract_masks(model, 0.75), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.safetensors"]  # stale temporaries cleaned


def test_a_failed_write_removes_its_temporaries_and_keeps_the_old_files(tmp_path):
    path = tmp_path / "adapter"
    save_lori(adapter(1), path)
    before = b_values(path)
    with pytest.raises(RuntimeError, match="disk full"):
        with write_directory(path, ["lori_config.json", "adapter.safetensors"], what="LoRI adapter") as out:
            out.file("adapter.safetensors").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert leftovers(path) == [] and same(b_values(path), before)
    with pytest.raises(OutputError, match="cannot write"):
        with atomic_file(tmp_path / "masks.safetensors") as tmp:
            tmp.write_bytes(b"x")
            raise OSError(28, "No space left on device")
    assert not (tmp_path / "masks.safetensors").exists()


def test_recover_does_nothing_to_a_directory_without_a_write_in_flight(tmp_path):
    (tmp_path / f".x.123{TMP_SUFFIX}").write_text("a temporary of a writer still running")
    recover(tmp_path)  # readers never delete: the writer may be alive
    assert (tmp_path / f".x.123{TMP_SUFFIX}").exists()


KILLED_SAVER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_files import adapter
    from lori.checkpoint import save_lori
    models = [adapter(1), adapter(2)]
    print("ready", flush=True)
    i = 0
    while True:
        save_lori(models[i % 2], {path!r})
        i += 1
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_during_saves_leaves_a_complete_adapter(tmp_path, seed):
    """A process saving two adapters in turn to one path, killed with SIGKILL at a random
    moment: the path holds one of them, complete."""
    path = tmp_path / "adapter"
    save_lori(adapter(1), path)
    script = KILLED_SAVER.format(tests=os.path.dirname(__file__), path=str(path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(random.Random(seed).uniform(0.05, 0.6))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    got = b_values(path)
    assert same(got, b_values(save_lori(adapter(1), tmp_path / "one"))) or same(
        got, b_values(save_lori(adapter(2), tmp_path / "two"))
    )
