"""Smoke runs of the benchmark suites (timings are never asserted; measured bytes are)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lori.bench import memory

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENVIRONMENT = ("device", "torch", "triton", "cuda", "commit", "date")


def rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``python -m lori.bench --quick`` (what ``lori bench --quick`` runs): every suite, from a
    working directory outside the checkout (the suites ship in the package)."""
    results = tmp_path_factory.mktemp("results")
    out = subprocess.run(
        [sys.executable, "-m", "lori.bench", "--quick", "--results", str(results)],
        capture_output=True,
        text=True,
        cwd=tmp_path_factory.mktemp("elsewhere"),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return results, out.stdout


def test_quick_writes_csv_json_png(quick):
    results, stdout = quick
    for suite, tables in {
        "kernels": ["kernels"],
        "memory": ["memory_layer", "memory_model", "memory_quantized", "memory_loss"],
        "storage": ["storage"],
    }.items():
        document = json.loads((results / f"{suite}_cpu.json").read_text())
        assert all(document["environment"][key] for key in ENVIRONMENT)
        for table in tables:
            assert document["tables"][table]
            assert all(row[key] for row in rows(results / f"{table}_cpu.csv") for key in ENVIRONMENT)
        assert (results / f"{suite}_cpu.png").stat().st_size > 0
    assert "| in × out |" in stdout and "| checkpoint |" in stdout
    assert not list(results.glob("*.partial"))  # CSVs are written to a temp file, then renamed


def test_kernels_rows_are_handed_over_after_every_case():
    """What lets ``lori bench`` write the kernel rows as it goes (an interrupted run keeps them)."""
    import torch

    from lori.bench import kernels

    calls = []
    tables = kernels.run(torch.device("cpu"), quick=True, backends=["reference"], progress=calls.append)
    assert len(calls) == len(kernels.grid("cpu", quick=True)) and calls[-1] == tables["kernels"]


def test_quick_kernels(quick):
    results, _ = quick
    table = rows(results / "kernels_cpu.csv")
    layer = [r for r in table if r["part"] == "layer"]
    assert {"base", "peft_lora", "lori_original", "reference"} <= {r["impl"] for r in layer}
    assert "triton" not in {r["impl"] for r in table}  # never its interpreter on the CPU
    assert {r["pass"] for r in layer} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["part"] for r in table} == {"layer", "lora_path"}
    assert all(float(r["ms"]) > 0 and float(r["ratio"]) > 0 for r in table)


def test_quick_generate_a(ext, quick):
    results, _ = quick
    table = rows(results / "generate_a_cpu.csv")
    assert len(table) == 4 and {r["impl"] for r in table} == {"reference", "cpu_ext"}


def test_quick_memory(quick):
    results, _ = quick
    layer = rows(results / "memory_layer_cpu.csv")
    lori = [r for r in layer if r["impl"] in ("reference", "cpu_ext")]
    assert lori and all(float(r["x_mr"]) == 1.0 for r in lori)  # M·r elements, dropout or not
    peft = {r["dropout"]: float(r["x_mr"]) for r in layer if r["impl"] == "peft_lora"}
    assert peft["0.05"] > peft["0.0"] > 1.0
    model = {(r["variant"], r["dropout"]): r for r in rows(results / "memory_model_cpu.csv")}
    for dropout in ("0.0", "0.05"):
        lori_s, peft = model[("lori_s", dropout)], model[("peft_lora", dropout)]
        assert int(lori_s["trainable_params"]) < 0.5 * int(model[("lori_d", dropout)]["trainable_params"])
        assert int(lori_s["adamw_bytes"]) < int(peft["adamw_bytes"])
        assert 0 < int(lori_s["peak_bytes"]) < int(peft["peak_bytes"])
    quantized = {r["base"]: int(r["model_bytes"]) for r in rows(results / "memory_quantized_cpu.csv")}
    assert quantized["nf4"] < quantized["int8"] < quantized["bfloat16"]


def test_loss_peak_on_meta_is_the_real_peak():
    """The memory_loss table counts live tensors on the meta device; on real CPU tensors the
    peak is the same, byte for byte, with the full logits and in chunks."""
    for chunk in memory.LOSS_CHUNKS:
        peaks = [memory.loss_peak(2048, 32, 1536, torch.bfloat16, chunk, torch.device(d)) for d in ("cpu", "meta")]
        assert peaks[0] == peaks[1] > 0


def test_committed_loss_memory_row():
    """issue 16: the chunked loss cuts the loss's peak by at least 4x at vocab 128k, 8k tokens."""
    table = {int(r["loss_chunk_tokens"]): int(r["peak_bytes"]) for r in rows(RESULTS / "memory_loss_cpu.csv")}
    assert table[0] >= 4 * table[1024] and table[0] > 128256 * 8192 * 4  # at least the fp32 logits


def test_quick_storage(quick):
    results, _ = quick
    table = rows(results / "storage_cpu.csv")
    ours = next(r for r in table if (r["method"], r["r"], r["sparsity"], r["block"]) == ("lori", "32", "0.9", "32x32"))
    assert float(ours["ratio"]) <= 0.055  # DESIGN.md's target


def test_report_renders_committed_results(tmp_path):
    """The README's tables and the plots come from the committed CPU results."""
    from lori.bench import report

    text = report.markdown(RESULTS)
    assert text.startswith("#### CPU") and "| in × out |" in text and "| checkpoint |" in text
    plots = {p.name for p in report.plots(RESULTS, tmp_path)}
    assert plots == {"kernels_cpu.png", "memory_cpu.png", "storage_cpu.png", "interference_cpu.png", "serving_cpu.png"}


def test_pytest_benchmark_suites_run():
    """``pytest benchmarks/`` collects, and every one of its test functions runs (once,
    untimed) for some of its parameters: the rest only vary what the quick run covers."""
    subset = "reference or generate_a or lori_s or saved or save_lori or save_peft"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks",
            "-q",
            "--benchmark-disable",
            "-p",
            "no:cacheprovider",
            "-k",
            subset,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_lori_bench_on_the_command_line_renders_committed_results(tmp_path, capsys):
    """`lori bench --report-only` draws the plots and prints the tables of a results directory."""
    import shutil

    from lori.cli import main

    results = tmp_path / "results"
    shutil.copytree(Path(__file__).resolve().parents[1] / "benchmarks" / "results", results)
    assert main(["bench", "--report-only", "--results", str(results)]) == 0
    assert "| in × out |" in capsys.readouterr().out
    assert {p.name for p in results.glob("*.png")} >= {
        "kernels_cpu.png",
        "memory_cpu.png",
        "storage_cpu.png",
        "serving_cpu.png",
    }


def test_readme_benchmark_tables_are_the_committed_results():
    """Every table row of the README's benchmark section is in the report rendered from
    the committed results files."""
    from lori.bench import report

    rendered = report.markdown(RESULTS)
    section = (ROOT / "README.md").read_text().split("\n## Benchmarks\n")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert len(rows) > 20
    missing = [row for row in rows if row not in rendered]
    assert not missing, missing[:3]


def test_readme_serving_tables_are_the_committed_results():
    """Every table row of the README's serving section (timings, adapter memory) is in the
    report rendered from the committed serving results."""
    from lori.bench import report

    rendered = report.markdown(RESULTS)
    section = (ROOT / "README.md").read_text().split("\n## Serving many adapters\n")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 8 + 2 + 8  # two phases and two models, four N each
    missing = [row for row in rows if row not in rendered]
    assert not missing, missing[:3]


def test_serving_memory_is_the_measured_memory():
    """The adapter bytes computed from shapes equal, at the CPU-sized model, what the serving
    suite measured on the loaded adapters, for every N and both implementations: what lets
    the same arithmetic stand for Llama-3-8B. The committed table (CSV and JSON) is that arithmetic."""
    from lori.bench import serving
    from lori.bench.common import read_csv

    measured = {(r["impl"], r["n_adapters"]): r["adapter_bytes"] for r in read_csv(RESULTS / "serving_cpu.csv")}
    assert set(measured) == {(impl, n) for impl in ("lori", "peft") for n in serving.N_ADAPTERS}
    for (impl, n), nbytes in measured.items():
        assert serving.adapter_bytes(serving.MODEL, impl, n) == nbytes, (impl, n)

    def bytes_of(table):
        return [(r["model"], r["impl"], r["n_adapters"], r["adapter_bytes"]) for r in table]

    computed = bytes_of(serving.memory_rows({}))
    assert bytes_of(read_csv(RESULTS / "serving_memory_cpu.csv")) == computed
    document = json.loads((RESULTS / "serving_cpu.json").read_text())
    assert bytes_of(document["tables"]["serving_memory"]) == computed


def test_serving_memory_counts_the_blocks_random_block_mask_keeps():
    """The kept-block count of the arithmetic is ``random_block_mask``'s at every projection of
    both models, whose shapes are Llama's (Llama-3-8B's as the other suites have them)."""
    from lori.bench import common, serving
    from lori_kernels import block_sparse

    eight_b = serving.projections(serving.MEMORY_MODELS["Llama-3-8B"])
    assert set(eight_b.values()) == set(common.LLAMA3_8B_PROJECTIONS)
    g = torch.Generator().manual_seed(0)
    for config in serving.MEMORY_MODELS.values():
        for _, out in serving.projections(config).values():
            mask = common.random_block_mask(out, serving.R, serving.BLOCK, serving.SPARSITY, g)
            assert len(block_sparse.blocks_from_mask(mask, serving.BLOCK)) == common.kept_blocks(
                out, serving.R, serving.BLOCK, serving.SPARSITY
            ), out


def test_committed_serving_memory_goal():
    """issue 19: at Llama-3-8B's shapes, 64 LoRI-S adapters take less memory than 4 PEFT LoRA
    adapters of the same rank and dtype (on the CPU-sized model they do not: its k and v are two
    block rows tall, and one is kept)."""
    from lori.bench.common import read_csv

    table = read_csv(RESULTS / "serving_memory_cpu.csv")
    table = {(r["model"], r["impl"], r["n_adapters"]): r["adapter_bytes"] for r in table}
    assert table[("Llama-3-8B", "lori", 64)] < table[("Llama-3-8B", "peft", 4)]
