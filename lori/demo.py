"""``lori demo`` (``make demo``): the LoRI recipe end to end on the CPU in a few minutes.

1. a toy world made here: a character tokenizer, a tiny Llama pretrained on copying
   words (the base model), and a new task (shift every letter by one) with a held-out set;
2. the base model evaluated on the task;
3. LoRI-D: a dense B trained with FSDP2 on ``processes`` processes (torchrun, gloo);
4. masks: the largest 10% of B's blocks over all layers;
5. LoRI-S: B retrained from zero under the masks, FSDP2 again;
6. both adapters evaluated (loss, exact match), with what they cost on disk and in
   trainable parameters against a PEFT LoRA adapter of the same rank.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from lori import toy
from lori.checkpoint import load_lori
from lori.data import load_examples
from lori.errors import OutputError
from lori.evaluate import evaluate
from lori.files import atomic_file
from lori.masks import extract_masks, save_masks
from lori.model import lori_layers

log = logging.getLogger(__name__)

__all__ = ["run_demo"]

# The tiny model learns fast at high learning rates; the LoRI recipe's 5e-5 / 5e-4 are
# for 8B models.
RANK, BLOCK, LR, EPOCHS, SPARSITY = 16, (16, 4), 2e-2, 3, 0.9


def _train(workdir: Path, output: Path, processes: int, progress: bool, masks: Path | None = None) -> None:
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "lori.cli",
        "train",
        "--model",
        str(workdir / "base"),
        "--data",
        str(workdir / "data" / "train.jsonl"),
        "--output",
        str(output),
        "--rank",
        str(RANK),
        "--block",
        ",".join(map(str, BLOCK)),
        "--lr",
        str(LR),
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "8",
        "--log-every",
        "32",
        "--overwrite-output",  # the demo's own directory: a rerun starts over
        "--progress" if progress else "--no-progress",
    ]
    if masks is not None:
        args += ["--masks", str(masks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args, check=True, env=env)


def _adapter_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


MARKER = "lori-demo.json"  # what tells a directory the demo made from anyone else's


def _claim(workdir: Path) -> None:
    """Make ``workdir`` the demo's, refusing one that holds anything the demo did not
    write: the demo replaces what it finds under its own names (base/, data/, ...)."""
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / MARKER).is_file():
        raise OutputError(
            f"{workdir} holds files the demo did not write (no {MARKER}); give --workdir a new or empty directory"
        )
    with atomic_file(workdir / MARKER) as tmp:
        tmp.write_text(json.dumps({"written_by": "lori demo"}))


def run_demo(workdir: str | Path = "demo_output", *, processes: int = 2, progress: bool = True) -> dict:
    """Run the demo under ``workdir`` (new, empty, or an earlier demo's); return its
    figures (also logged step by step)."""
    from transformers import AutoModelForCausalLM

    workdir = Path(workdir)
    _claim(workdir)
    tokenizer = toy.build_tokenizer(workdir / "tokenizer")
    toy.build_base_model(workdir / "base", tokenizer, progress=progress)
    toy.write_jsonl(toy.caesar_examples(1024, 1, seed=10), workdir / "data" / "train.jsonl")
    toy.write_jsonl(toy.caesar_examples(128, 1, seed=11), workdir / "data" / "test.jsonl")
    test = load_examples(workdir / "data" / "test.jsonl")
    log.info(
        "1. toy world in %s: base model pretrained on copying; task: shift letters by one "
        "(1024 training, 128 held-out examples)",
        workdir,
    )

    def base_model():
        return AutoModelForCausalLM.from_pretrained(str(workdir / "base"))

    figures = {"base": evaluate(base_model(), tokenizer, test)}
    log.info(
        "2. base model on the task: loss %.3f, exact match %.1f%%",
        figures["base"]["loss"],
        100 * figures["base"]["exact_match"],
    )

    _train(workdir, workdir / "lori_d", processes, progress)
    lori_d = load_lori(base_model(), workdir / "lori_d" / "adapter")
    figures["lori_d"] = evaluate(lori_d, tokenizer, test)
    log.info(
        "3. LoRI-D (dense B, r %d, FSDP2 on %d processes): loss %.3f, exact match %.1f%%",
        RANK,
        processes,
        figures["lori_d"]["loss"],
        100 * figures["lori_d"]["exact_match"],
    )

    masks = extract_masks(lori_d, SPARSITY)
    save_masks(masks, workdir / "masks.safetensors")
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    log.info(
        "4. masks: %.1f%% of B kept (blocks %s, global top-k) -> %s", 100 * kept, BLOCK, workdir / "masks.safetensors"
    )

    _train(workdir, workdir / "lori_s", processes, progress, masks=workdir / "masks.safetensors")
    lori_s = load_lori(base_model(), workdir / "lori_s" / "adapter")
    figures["lori_s"] = evaluate(lori_s, tokenizer, test)
    log.info(
        "5. LoRI-S (B from zero under the masks): loss %.3f, exact match %.1f%%",
        figures["lori_s"]["loss"],
        100 * figures["lori_s"]["exact_match"],
    )

    layers = lori_layers(lori_s).values()
    peft_params = sum(RANK * (layer.in_features + layer.out_features) for layer in layers)
    figures["sizes"] = {
        "lori_d_bytes": _adapter_bytes(workdir / "lori_d" / "adapter"),
        "lori_s_bytes": _adapter_bytes(workdir / "lori_s" / "adapter"),
        "peft_lora_bytes": 4 * peft_params,
        "lori_s_trainable": sum(layer.b_values.numel() for layer in layers),
        "peft_lora_trainable": peft_params,
    }
    sizes = figures["sizes"]
    log.info(
        "6. LoRI-S adapter on disk: %d bytes (LoRI-D %d; a PEFT LoRA adapter of rank %d: %d, so %.1f%%); "
        "trainable parameters %d (PEFT LoRA: %d)",
        sizes["lori_s_bytes"],
        sizes["lori_d_bytes"],
        RANK,
        sizes["peft_lora_bytes"],
        100 * sizes["lori_s_bytes"] / sizes["peft_lora_bytes"],
        sizes["lori_s_trainable"],
        sizes["peft_lora_trainable"],
    )
    return figures
