"""`make demo` end to end: the LoRI recipe on a tiny Llama with FSDP2 on two processes."""

import subprocess
import sys
from pathlib import Path

import pytest

from lori.demo import run_demo
from lori.errors import OutputError


def test_lori_demo_command(tmp_path):
    """The installed `lori` command (what `make demo` runs) reports every step, and LoRI-S
    learns the task the base model cannot do."""
    lori = Path(sys.executable).with_name("lori")
    out = subprocess.run(
        [str(lori), "demo", "--workdir", str(tmp_path), "--no-progress"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    for line in [
        "1. toy world",
        "2. base model on the task",
        "3. LoRI-D",
        "4. masks",
        "5. LoRI-S",
        "6. LoRI-S adapter",
        "demo passed",
    ]:
        assert line in out.stdout
    for adapter in ("lori_d", "lori_s"):
        assert sorted(p.name for p in (tmp_path / adapter / "adapter").iterdir()) == [
            "adapter.safetensors",
            "lori_config.json",
        ]


def test_demo_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("my data\n")
    with pytest.raises(OutputError, match="holds files the demo did not write"):
        run_demo(tmp_path)
    assert [p.name for p in tmp_path.rglob("*")] == ["data", "train.jsonl"]
    assert (tmp_path / "data" / "train.jsonl").read_text() == "my data\n"
