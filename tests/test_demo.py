import subprocess
import sys
from pathlib import Path

from lori.demo import run_demo


def test_demo_finds_the_teacher_and_fits_it():
    figures = run_demo(in_features=64, out_features=96, r=8, block=(16, 4), tokens=256, steps=80, progress=False)
    assert figures["a_backends_identical"]
    assert figures["mask_recall"] == 1.0
    assert figures["test_loss_lori_s"] < 0.05 * figures["test_loss_base"]
    assert figures["saved_bytes_per_token_lori"] == 8 * 4  # r fp32 values, dropout or not
    assert figures["saved_bytes_per_token_lora_dropout"] > figures["saved_bytes_per_token_lora"]
    assert figures["adapter_bytes"] < 0.1 * figures["adapter_bytes_lora"]


def test_lori_demo_command():
    """The installed `lori` command (what `make demo` runs) reports each step."""
    lori = Path(sys.executable).with_name("lori")
    out = subprocess.run([str(lori), "demo", "--steps", "60", "--no-progress"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    for line in ["1. A [32, 512]", "2. LoRI-D", "3. Mask at sparsity 90%", "4. LoRI-S", "5. Trainable", "demo passed"]:
        assert line in out.stdout
