"""The interference suite (`lori bench --suite interference`): a quick run's structure and
ranges (no accuracy is asserted: a quick run trains for four steps), its scoring against
``lori.evaluate``, the toy tasks, and the committed results' rendering."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lori import toy

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENVIRONMENT = ("device", "torch", "triton", "cuda", "commit", "date")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``python -m lori.bench --suite interference --quick`` from outside the checkout."""
    results = tmp_path_factory.mktemp("results")
    out = subprocess.run(
        [sys.executable, "-m", "lori.bench", "--suite", "interference", "--quick", "--results", str(results)],
        capture_output=True,
        text=True,
        cwd=tmp_path_factory.mktemp("elsewhere"),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return results, out.stdout


def test_quick_writes_csv_json_png_and_the_tables(quick):
    results, stdout = quick
    document = json.loads((results / "interference_cpu.json").read_text())
    assert document["suite"] == "interference" and document["settings"]["quick"]
    assert all(document["environment"][key] for key in ENVIRONMENT)
    rows = list(csv.DictReader((results / "interference_cpu.csv").open()))
    assert rows and all(row[key] for row in rows for key in ENVIRONMENT)
    assert len(rows) == len(document["tables"]["interference"])
    assert (results / "interference_cpu.png").stat().st_size > 0
    assert "| method | trained values | setting | shift | reverse | atbash | double | mean |" in stdout
    assert "| method | shift alone | double alone | after both: shift | after both: double |" in stdout


def test_quick_rows_cover_every_method_setting_and_task(quick):
    from lori.bench.interference import CONTINUAL, METHODS, TASKS

    results, _ = quick
    rows = json.loads((results / "interference_cpu.json").read_text())["tables"]["interference"]
    seen = [(r["method"], r["setting"], r["task"]) for r in rows]
    expected = [("base", "single", t) for t in TASKS]
    for method in METHODS:
        expected += [(method.name, s, t) for s in ("single", "scaled", "merge_linear", "merge_cat") for t in TASKS]
        expected += [(method.name, "continual", t) for t in CONTINUAL]
    assert sorted(seen) == sorted(expected)
    for r in rows:
        assert 0.0 <= r["exact_match"] <= 1.0
        assert math.isfinite(r["loss"]) and r["loss"] > 0
    single = {r["method"]: r["trained_values"] for r in rows if (r["setting"], r["task"]) == ("single", "shift")}
    assert single["base"] == 0
    assert single["lora"] == 2 * single["lori_d"]  # A and B against B alone
    for sparse in ("lori_s", "lori_s_blocks"):  # 10% of B: int(0.1 N) entries or blocks, and any tied
        assert 0.05 * single["lori_d"] <= single[sparse] <= 0.15 * single["lori_d"]


def test_quick_merge_weights_are_the_original_scripts(quick):
    """Four adapters: 0.4 each for LoRA and LoRI-D, 0.3 for LoRI-S (merge_4_loras.sh), the
    weights lori.merge picks by itself."""
    from lori.merge import ORIGINAL_WEIGHTS

    results, _ = quick
    rows = json.loads((results / "interference_cpu.json").read_text())["tables"]["interference"]
    dense, sparse = ORIGINAL_WEIGHTS[4]
    for r in rows:
        if r["setting"] in ("scaled", "merge_linear", "merge_cat"):
            assert r["merge_weight"] == (sparse if r["method"].startswith("lori_s") else dense)


def test_scoring_agrees_with_lori_evaluate(tmp_path):
    """The suite's batched greedy exact match and its response loss are lori.evaluate's."""
    from lori.bench.interference import exact_match, response_loss
    from lori.evaluate import evaluate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster, and much faster on a busy machine
    try:
        tokenizer = toy.build_tokenizer(tmp_path / "tokenizer")
        model = toy.build_base_model(tmp_path / "base", tokenizer, steps=60, progress=False)
        examples = toy.caesar_examples(24, 0, seed=5) + toy.task_examples("double", 8, seed=6)
        reference = evaluate(model, tokenizer, examples)
    finally:
        torch.set_num_threads(threads)
    assert 0 < reference["exact_match"] < 1  # some answers right, some wrong: the comparison means something
    assert exact_match(model, tokenizer, examples) == reference["exact_match"]
    assert response_loss(model, tokenizer, examples) == pytest.approx(reference["loss"], rel=1e-5)


def test_lora_trains_on_the_batches_lori_train_draws(tmp_path, monkeypatch):
    """The suite's LoRA loop takes ``World.batches``; they are the batches ``lori.train``
    gives LoRI on the same task (its data order, seeded by the task)."""
    from lori.bench import interference
    from lori.data import collate
    from lori.train import loop

    drawn = []

    def recording_collate(*args):
        drawn.append(collate(*args))
        return drawn[-1]

    monkeypatch.setattr(loop, "collate", recording_collate)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        world = interference.World(tmp_path, interference.QUICK)
        lori_d = next(m for m in interference.METHODS if m.name == "lori_d")
        interference.train_adapter(world, lori_d, "reverse", tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    ours = list(world.batches("reverse"))
    assert len(drawn) == len(ours) == interference.QUICK.steps
    for theirs, mine in zip(drawn, ours, strict=True):
        assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in theirs)


def test_toy_tasks():
    for task, word, answer in [("shift", "abz", "bca"), ("reverse", "abc", "cba"), ("atbash", "abz", "zya")]:
        assert toy.TASKS[task](word) == answer
    assert toy.TASKS["double"]("abc") == "aabbcc"
    examples = toy.task_examples("reverse", 5, seed=3)
    assert examples == toy.task_examples("reverse", 5, seed=3)
    for e in examples:
        prefix, word = e["prompt"].split(":")
        assert prefix == "reverse" and 3 <= len(word) <= 6 and e["response"] == word[::-1]
    with pytest.raises(ValueError, match="unknown task"):
        toy.task_examples("upper", 1, seed=0)


def test_all_leaves_the_interference_suite_out():
    """`lori bench` (all) runs the speed, memory and storage suites; interference only when named."""
    from lori import bench

    assert "interference" in bench.SUITES and "interference" not in bench.ALL


def test_committed_interference_results_render():
    from lori.bench import report

    text = report.markdown(RESULTS)
    assert "Interference (`lori bench --suite interference`" in text
    assert "| method | trained values | setting |" in text and "after both:" in text
