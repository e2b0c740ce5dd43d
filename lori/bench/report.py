"""Markdown tables and PNG plots from the results files of ``lori bench``.

    python -m lori.bench.report [--results DIR]

reads ``<table>_<device>.csv`` (and the suites' ``.json`` for the device and versions) under
DIR, prints the tables as markdown (what README's benchmark section shows) and writes the
plots beside the results. Missing tables are skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import RESULTS, read_csv

DEVICES = ("cuda", "cpu")
OURS_FIRST = ("triton", "triton_epilogue", "cuda_ext", "cpu_ext", "reference")
BASELINES = ("peft_lora", "lori_original")


def _load(results: Path, table: str, device: str) -> list[dict]:
    path = results / f"{table}_{device}.csv"
    return read_csv(path) if path.is_file() else []


def _environment(results: Path, device: str) -> dict | None:
    for suite in ("kernels", "memory", "storage", "interference"):
        path = results / f"{suite}_{device}.json"
        if path.is_file():
            return json.loads(path.read_text())["environment"]
    return None


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _impls(rows: list[dict]) -> list[str]:
    """Implementations present, in the order base, baselines, ours (fastest first)."""
    present = {r["impl"] for r in rows}
    return [n for n in ("base", *BASELINES, *OURS_FIRST) if n in present] + sorted(
        present - {"base", *BASELINES, *OURS_FIRST}
    )


def _megabytes(n: int) -> str:
    """Three significant digits, no exponent."""
    return f"{n / 1e6:,.3g}" if n < 1e9 else f"{n / 1e6:,.0f}"


def _case_key(row: dict) -> tuple:
    return (row["in"], row["out"], row["M"], row["r"], row["sparsity"], row["dtype"])


def merge_markdown(rows: list[dict]) -> str:
    """The ``merge`` table: materializing ΔW for folding, against PEFT's dense product."""
    if not rows:
        return ""
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["in"], r["out"], r["sparsity"]), {})[r["impl"]] = r
    names = [n for n in OURS_FIRST if any(n in v for v in by_case.values())]
    lines = [
        [f"{i} × {o}", s, f"{v['peft_merge']['ms']:.3g} ms"] + [f"{v[n]['ratio']:.2f}×" for n in names]
        for (i, o, s), v in by_case.items()
    ]
    r = rows[0]["r"]
    intro = (
        f"\nFolding an adapter: materializing ΔW = s·B·A (float32, r {r}), time over PEFT's dense `B @ A · s` of "
        "stored A and B (`delta_weight`: A regenerated, the backend's block-sparse expand over the kept blocks):\n"
    )
    return intro + "\n" + _table(["in × out", "sparsity", "peft_merge"] + names, lines)


def kernels_markdown(rows: list[dict], generate_a: list[dict]) -> str:
    layer = [r for r in rows if r["part"] == "layer"]
    path = {(_case_key(r), r["impl"]): r for r in rows if r["part"] == "lora_path"}
    impls = _impls(layer)
    ours = [n for n in impls if n in OURS_FIRST]
    by_case: dict[tuple, dict] = {}
    for r in layer:
        by_case.setdefault(_case_key(r), {})[(r["pass"], r["impl"])] = r
    out = []
    header = ["in × out", "M", "r", "sparsity", "dtype", "base"] + [f"{n}" for n in impls if n != "base"]
    paths = [n for n in ["unfused", *ours] if n != "reference" and any(i == n for _, i in path)]
    header += [f"adapter alone, speed-up: {n}" for n in paths]
    table = []
    for key, cells in by_case.items():
        inp, outf, m, r, s, dtype = key
        line = [f"{inp} × {outf}", m, r, s, dtype, f"{cells[('fwd+bwd', 'base')]['ms']:.3g} ms"]
        line += [f"{cells[('fwd+bwd', n)]['ratio']:.2f}×" for n in impls if n != "base"]
        for n in paths:
            p = path.get((key, n))
            line.append(f"{1 / p['ratio']:.1f}×" if p else "-")
        table.append(line)
    out.append(
        "Forward + backward, time over the frozen base linear's (lower is better; 1.00× = a free adapter). "
        "`adapter alone`: the LoRA part only, speed-up over the reference backend's five kernels "
        "(higher is better; `unfused` is torch's `B(A(x))·s`, as PEFT runs it).\n"
    )
    out.append(_table(header, table))
    centre = _centre(by_case)
    if centre is not None:
        inp, outf, m, r, s, dtype = centre
        out.append(f"\nBy pass at in × out {inp} × {outf}, M {m}, r {r}, sparsity {s}, {dtype} (ratio to base):\n")
        rows_ = [
            [p, f"{by_case[centre][(p, 'base')]['ms']:.3g} ms"]
            + [f"{by_case[centre][(p, n)]['ratio']:.2f}×" for n in impls if n != "base"]
            for p in ("fwd", "bwd", "fwd+bwd")
        ]
        out.append(_table(["pass", "base"] + [n for n in impls if n != "base"], rows_))
    if generate_a:
        out.append("\nRegenerating A from its seed (float32), bit-identical on every backend:\n")
        ga = {}
        for r in generate_a:
            ga.setdefault((r["r"], r["d_in"]), {})[r["impl"]] = r
        names = [n for n in OURS_FIRST if any(n in v for v in ga.values()) and n != "reference"]
        rows_ = [
            [f"{r} × {d}", f"{v['reference']['ms']:.3g} ms"]
            + [f"{v[n]['ms']:.3g} ms ({1 / v[n]['ratio']:.1f}×)" for n in names]
            for (r, d), v in ga.items()
        ]
        out.append(_table(["r × d_in", "reference"] + [f"{n} (speed-up)" for n in names], rows_))
    return "\n".join(out)


def _centre(by_case: dict) -> tuple | None:
    """The case that has the most neighbours in the star (the centre), if any."""
    if not by_case:
        return None
    keys = list(by_case)
    return max(keys, key=lambda k: sum(sum(a != b for a, b in zip(k, other, strict=True)) == 1 for other in keys))


def memory_markdown(layer: list[dict], model: list[dict]) -> str:
    out = []
    if layer:
        first = layer[0]
        out.append(
            f"Saved for backward by one layer (in × out {first['in']} × {first['out']}, M {first['M']}, "
            f"r {first['r']}, sparsity {first['sparsity']}, {first['dtype']}), in units of M·r elements "
            "(weights excluded):\n"
        )
        by = {(r["impl"], r["dropout"]): r for r in layer}
        dropouts = sorted({r["dropout"] for r in layer})
        rows_ = [[n] + [f"{by[(n, d)]['x_mr']:g}" for d in dropouts] for n in _impls(layer)]
        out.append(_table(["implementation"] + [f"dropout {d:g}" for d in dropouts], rows_))
    if model:
        first = model[0]
        out.append(
            f"\nOne training step of a Llama-shaped model (hidden {first['hidden']}, MLP "
            f"{first['intermediate']}, {first['layers']} layers, vocab {first['vocab']}, {first['tokens']} tokens, "
            f"{first['dtype']}; r {first['r']}, LoRI-S sparsity {first['sparsity']}; peak: "
            f"{first['peak_method'].replace('_', ' ')}), MB:\n"
        )
        peft = {r["dropout"]: r for r in model if r["variant"] == "peft_lora"}
        rows_ = []
        for r in model:
            state = r["trainable_bytes"] + r["grad_bytes"] + r["adamw_bytes"]
            ref = peft.get(r["dropout"])
            ref_state = ref["trainable_bytes"] + ref["grad_bytes"] + ref["adamw_bytes"] if ref else 0
            rows_.append(
                [
                    r["variant"],
                    f"{r['dropout']:g}",
                    f"{r['trainable_params']:,}",
                    _megabytes(state) + (f" ({state / ref_state:.0%})" if ref_state else ""),
                    _megabytes(r["saved_bytes"]),
                    _megabytes(r["peak_bytes"]),
                    _megabytes(r["peak_bytes"] - r["model_bytes"]),
                ]
            )
        header = ["variant", "dropout", "trainable params", "params + grads + AdamW (% of PEFT)", "saved activations"]
        out.append(_table(header + ["step peak", "peak above the model's tensors"], rows_))
    return "\n".join(out)


def loss_memory_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    first = rows[0]
    out = [
        f"The loss and its backward at vocab {first['vocab']:,}, hidden {first['hidden']}, {first['tokens']} tokens, "
        f"{first['dtype']} (peak: {first['peak_method'].replace('_', ' ')}):\n"
    ]
    full = next((r["peak_bytes"] for r in rows if r["loss_chunk_tokens"] == 0), None)
    table = [
        [
            "full logits" if r["loss_chunk_tokens"] == 0 else f"chunks of {r['loss_chunk_tokens']} tokens",
            _megabytes(r["peak_bytes"]),
            f"{full / r['peak_bytes']:.1f}x" if full else "-",
        ]
        for r in rows
    ]
    out.append(_table(["loss", "peak, MB", "full logits' peak / this"], table))
    return "\n".join(out)


def quantized_memory_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    first = rows[0]
    out = [
        f"LoRI-S's training step over a quantized base (`lori.quantize_base`), hidden {first['hidden']}, "
        f"{first['layers']} layers, {first['tokens']} tokens, activations {first['dtype']} (peak: "
        f"{first['peak_method'].replace('_', ' ')}):\n"
    ]
    plain = {k: next((r[k] for r in rows if r["base"] == "bfloat16"), None) for k in ("model_bytes", "peak_bytes")}
    table = [
        [
            r["base"],
            _megabytes(r["model_bytes"]),
            _megabytes(r["peak_bytes"]),
            f"{r['peak_bytes'] / plain['peak_bytes']:.2f}x" if plain["peak_bytes"] else "-",
        ]
        for r in rows
    ]
    out.append(_table(["base", "model, MB", "peak, MB", "peak / bf16 base's"], table))
    return "\n".join(out)


def storage_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    names = {"peft_lora": "PEFT LoRA", "lori_original": "original LoRI-S (PEFT file)", "lori": "ours"}
    out = [f"Checkpoint on disk, {rows[0]['model']}, bf16 (tensors + config file):\n"]
    table = [
        [
            names.get(r["method"], r["method"]),
            r["r"],
            r["sparsity"] if r["method"] != "peft_lora" else "-",
            r["block"],
            f"{r['total_bytes'] / 1e6:.2f} MB",
            f"{100 * r['ratio']:.2f}%",
        ]
        for r in sorted(rows, key=lambda r: (r["r"] != 32, r["r"], r["method"] != "peft_lora", r["sparsity"]))
    ]
    out.append(_table(["checkpoint", "r", "sparsity", "block", "size", "of PEFT LoRA"], table))
    return "\n".join(out)


INTERFERENCE_SETTINGS = {
    "single": "single task",
    "scaled": "alone, at its merge weight",
    "merge_linear": "merged, linear",
    "merge_cat": "merged, cat",
}


def _em_loss(row: dict) -> str:
    return f"{100 * row['exact_match']:.0f}% ({row['loss']:.2f})"


def interference_markdown(rows: list[dict]) -> str:
    """The ``interference`` tables: each method's exact match (and response loss) per task,
    single-task, alone at its merge weight and merged; then continual learning."""
    if not rows:
        return ""
    first = rows[0]
    tasks = list(dict.fromkeys(r["task"] for r in rows if r["method"] == "base"))
    cell = {(r["method"], r["setting"], r["task"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    intro = (
        f"Interference (`lori bench --suite interference`, {first['device']}, commit {first['commit']}, "
        f"{first['date']}; the whole suite {first['suite_seconds']:.0f} s): {len(tasks)} toy tasks on one base model, "
        f"r {first['r']}, LoRI-S sparsity {first['sparsity']}, {first['steps']} steps of {first['batch_size']} "
        f"examples with the original LoRI code's recipe; exact match on {first['test_examples']} held-out words per "
        f"task, in parentheses the response loss (nats per token). Merge weights: the original scripts' for "
        f"{len(tasks)} adapters.\n"
    )
    table = []
    for method in methods:
        settings = [s for s in INTERFERENCE_SETTINGS if (method, s, tasks[0]) in cell]
        for i, setting in enumerate(settings):
            line = [cell[(method, setting, t)] for t in tasks]
            name = line[0]["label"] if i == 0 else ""
            values = f"{line[0]['trained_values']:,}" if i == 0 else ""
            label = INTERFERENCE_SETTINGS[setting]
            if line[0]["merge_weight"] != "":
                label += (
                    f" ({line[0]['merge_weight']:g} each)" if setting != "scaled" else f" {line[0]['merge_weight']:g}"
                )
            mean_em = sum(r["exact_match"] for r in line) / len(line)
            mean_loss = sum(r["loss"] for r in line) / len(line)
            mean = f"{100 * mean_em:.0f}% ({mean_loss:.2f})"
            table.append([name, values, label if method != "base" else "-", *map(_em_loss, line), mean])
    out = [intro, _table(["method", "trained values", "setting", *tasks, "mean"], table)]
    continual = [r for r in rows if r["setting"] == "continual"]
    if continual:
        order = list(dict.fromkeys(r["task"] for r in continual))
        first_task, second_task = order
        out.append(
            f"\nContinual learning: {first_task}, then {second_task} trained on top of it (LoRA and LoRI-D keep "
            f"training the whole adapter; LoRI-S trains only {second_task}'s mask, the rest of B kept as "
            f"{first_task} left it); exact match (response loss):\n"
        )
        header = [
            "method",
            f"{first_task} alone",
            f"{second_task} alone",
            f"after both: {first_task}",
            f"after both: {second_task}",
        ]
        table = [
            [
                cell[(m, "continual", first_task)]["label"],
                _em_loss(cell[(m, "single", first_task)]),
                _em_loss(cell[(m, "single", second_task)]),
                _em_loss(cell[(m, "continual", first_task)]),
                _em_loss(cell[(m, "continual", second_task)]),
            ]
            for m in methods
            if (m, "continual", first_task) in cell
        ]
        out.append(_table(header, table))
    return "\n".join(out)


SERVING_IMPLS = {"lori": ("LoRI-S", "lori.adapter_batch"), "peft": ("PEFT LoRA", "adapter_names=")}


def _phase_name(row: dict) -> str:
    if row["phase"] == "prefill":
        return f"prefill ({row['tokens_per_row']} tokens/row)"
    return f"decode ({row['tokens_per_row']} token/row, KV cache)"


def serving_markdown(rows: list[dict]) -> str:
    """The ``serving`` table: per phase and number of adapters N, LoRI's and PEFT's whole forward
    over the base model's, and their adapter paths (forward minus base), measured in one run."""
    if not rows:
        return ""
    first = rows[0]
    cell = {(r["phase"], r["n_adapters"], r["impl"]): r for r in rows}
    intro = (
        f"Serving (`lori bench --suite serving`, {first['device']}, commit {first['commit']}, {first['date']}): "
        f"{first['rows']} rows with adapters drawn at random from N, r {first['r']}, {first['dtype']}; LoRI-S "
        f"adapters over one seed (sparsity {first['sparsity']}, blocks {first['block']}) against PEFT LoRA's "
        "`adapter_names=`; adapter path = forward minus the base model's forward, timed interleaved:\n"
    )

    def over_base(r: dict) -> str:
        return f"{r['ms_forward'] / r['ms_base']:.2f} ({r['ms_forward']:.1f} / {r['ms_base']:.1f} ms)"

    table = []
    for phase in ("prefill", "decode"):
        for i, n in enumerate(sorted({n for p, n, _ in cell if p == phase})):
            lori, peft = cell[(phase, n, "lori")], cell[(phase, n, "peft")]
            table.append(
                [_phase_name(lori) if i == 0 else phase, n, over_base(lori), f"{lori['ms_adapter_path']:.1f}"]
                + [over_base(peft), f"{peft['ms_adapter_path']:.1f}"]
                + [f"{peft['ms_adapter_path'] / lori['ms_adapter_path']:.1f}x"]
            )
    header = ["phase", "N", "LoRI forward / base", "LoRI adapter path (ms)", "PEFT forward / base"]
    return intro + "\n" + _table(header + ["PEFT adapter path (ms)", "PEFT / LoRI adapter path"], table)


def serving_memory_markdown(rows: list[dict]) -> str:
    """The ``serving_memory`` table: the bytes of N LoRI-S and N PEFT LoRA adapters as loaded,
    computed per model from its shapes, against each other and against 4 PEFT adapters."""
    if not rows:
        return ""
    lori = [r for r in rows if r["impl"] == "lori"]
    first = lori[0]
    peft = {(r["model"], r["n_adapters"]): r["adapter_bytes"] for r in rows if r["impl"] == "peft"}
    intro = (
        f"Memory of the N adapters as loaded, computed from the shapes (at the CPU-sized model equal, byte for byte, "
        f"to the `adapter_bytes` measured above), r {first['r']}, {first['dtype']}: LoRI-S keeps "
        f"{1 - first['sparsity']:.0%} of each projection's blocks {first['block']} (rounded, at least one) and holds "
        "their values, their indices (int32) and a seed (int64) per layer; PEFT LoRA holds A and B:\n"
    )
    table = []
    for model in dict.fromkeys(r["model"] for r in lori):
        for i, r in enumerate(r for r in lori if r["model"] == model):
            same_n, fours = peft[(model, r["n_adapters"])], peft[(model, 4)]
            kept = f"{r['kept_blocks']:,} of {r['blocks']:,} ({r['kept_blocks'] / r['blocks']:.1%})"
            described = f"{model} ({r['hidden']} / {r['intermediate']}, {r['layers']} layers)"
            table.append(
                [described if i == 0 else "", kept if i == 0 else "", r["n_adapters"]]
                + [_megabytes(r["adapter_bytes"]), _megabytes(same_n)]
                + [f"{r['adapter_bytes'] / same_n:.3g}x", f"{r['adapter_bytes'] / fours:.3g}x"]
            )
    header = ["model (hidden / MLP)", "LoRI-S kept blocks", "N", "LoRI-S (MB)", "PEFT LoRA (MB)", "LoRI-S / PEFT"]
    return intro + "\n" + _table(header + ["LoRI-S / 4 PEFT adapters"], table)


ROOFLINE_PLANS = ("triton", "triton_epilogue", "cuda_ext", "reference")


def roofline_markdown(rows: list[dict], kernels: list[dict], assumptions: list[dict]) -> str:
    """The ``roofline`` model's tables: predicted ratios at the target case (Llama-3-8B, M 8192,
    r 32, sparsity 0.9) per projection and per decoder layer (and Llama-3-70B's), the Triton GEMM
    efficiency each Triton-GEMM plan needs for 1.05×, the kernels at the kernels suite's centre
    shape, and the assumptions."""
    if not rows:
        return ""
    first = rows[0]
    centre = [r for r in rows if (r["M"], r["r"], r["sparsity"]) == (8192, 32, 0.9)]
    shown = [r for r in centre if r["model"] == "Llama-3-8B" or r["projection"] == "decoder layer"]
    cells = {(r["model"], r["projection"], r["dropout"], r["plan"]): r for r in shown}
    plans = [p for p in ROOFLINE_PLANS if any(r["plan"] == p for r in shown)]
    cases = list(dict.fromkeys((r["model"], r["projection"], r["in"], r["out"], r["dropout"]) for r in shown))
    out = [
        f"Roofline model (`lori bench --suite roofline`, commit {first['commit']}, {first['date']}; predicted, no GPU "
        "measured): each backend's forward + backward kernel plan (the code's, checked by tests/test_roofline.py) "
        "over the frozen base linear's (cuBLAS), on an H100 SXM / an H200 at datasheet peaks times the efficiencies "
        "below; M 8192, r 32, block sparsity 0.9, bf16.\n"
    ]
    table = [
        [model, projection, f"{inp} × {outf}" if inp != "-" else "-", f"{dropout:g}"]
        + [
            f"{cells[(model, projection, dropout, p)]['h100_ratio']:.2f}× / "
            f"{cells[(model, projection, dropout, p)]['h200_ratio']:.2f}×"
            for p in plans
        ]
        for model, projection, inp, outf, dropout in cases
    ]
    out.append(_table(["model", "projection", "in × out", "dropout"] + [f"{p} (H100 / H200)" for p in plans], table))
    gemm_plans = [p for p in plans if any(cells[c]["h100_break_even"] != "-" for c in cells if c[3] == p)]
    layers = [c for c in cases if c[1] == "decoder layer"]
    if gemm_plans and layers:
        out.append(
            "\nTriton GEMM efficiency (fraction of the bf16 peak) at which a plan reaches 1.05× per decoder layer, "
            "and in parentheses its ratio if its GEMMs ran at cuBLAS's efficiency:\n"
        )

        def needed(row: dict, key: str) -> str:
            return f"{row[f'{key}_break_even']} ({row[f'{key}_ratio_cublas_gemm']:.2f}×)"

        table = [
            [model, f"{dropout:g}"]
            + [
                f"{needed(cells[(model, projection, dropout, p)], 'h100')} / "
                f"{needed(cells[(model, projection, dropout, p)], 'h200')}"
                for p in gemm_plans
            ]
            for model, projection, _, _, dropout in layers
        ]
        out.append(_table(["model", "dropout"] + [f"{p} (H100 / H200)" for p in gemm_plans], table))
    at = [k for k in kernels if (k["M"], k["in"], k["out"], k["r"], k["sparsity"]) == (8192, 4096, 14336, 32, 0.9)]
    at = [k for k in at if k["dropout"] == 0 and k["plan"] in ("base", "triton", "triton_epilogue")]
    if at:
        out.append("\nBy kernel at 4096 × 14336 (the kernels suite's centre), dropout 0, H100 SXM:\n")
        table = [
            [k["plan"], k["pass"], f"`{k['kernel']}`", f"{k['MB']:g}", f"{k['tensor_GFLOP'] + k['core_GFLOP']:g}"]
            + [f"{k['int_Gops']:g}", k["launches"], f"{k['h100_us']:g}", k["h100_bound"]]
            for k in at
        ]
        header = ["plan", "pass", "kernel", "MB", "GFLOP", "integer Gop", "launches", "µs", "bound by"]
        out.append(_table(header, table))
    if assumptions:
        out.append("\nAssumptions (`lori/bench/roofline.py`):\n")
        out.append(_table(["constant", "value"], [[f"`{a['name']}`", f"{a['value']:g}"] for a in assumptions]))
    return "\n".join(out)


def markdown(results: Path = RESULTS) -> str:
    """Every results table under ``results`` as markdown, one section per device."""
    sections = []
    for device in DEVICES:
        env = _environment(results, device)
        parts = [
            kernels_markdown(_load(results, "kernels", device), _load(results, "generate_a", device))
            if _load(results, "kernels", device)
            else "",
            merge_markdown(_load(results, "merge", device)),
            memory_markdown(_load(results, "memory_layer", device), _load(results, "memory_model", device)),
            quantized_memory_markdown(_load(results, "memory_quantized", device)),
            loss_memory_markdown(_load(results, "memory_loss", device)),
            storage_markdown(_load(results, "storage", device)),
            interference_markdown(_load(results, "interference", device)),
            serving_markdown(_load(results, "serving", device)),
            serving_memory_markdown(_load(results, "serving_memory", device)),
        ]
        parts = [p for p in parts if p]
        if not parts:
            continue
        where = "GPU" if device == "cuda" else "CPU"
        if env:
            where += (
                f": {env['device']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
                f"commit {env['commit']}, {env['date']}"
            )
        sections.append(f"#### {where}\n\n" + "\n\n".join(parts))
    roofline = [_load(results, table, "model") for table in ("roofline", "roofline_kernels", "roofline_assumptions")]
    if roofline[0]:
        sections.append("#### Roofline model: H100 SXM and H200, predicted\n\n" + roofline_markdown(*roofline))
    return "\n\n".join(sections)


def interference_figure(rows: list[dict], label: str):
    """Mean exact match and response loss over the tasks per method and setting, and
    continual learning's two tasks before and after; titled with ``label`` (CPU or GPU) and
    the rows' own device and commit (the suite runs apart from the others)."""
    from matplotlib.figure import Figure

    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "base"]
    labels = {r["method"]: r["label"] for r in rows}
    fig = Figure(figsize=(14, 4.2))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    width = 0.8 / len(INTERFERENCE_SETTINGS)
    for i, (setting, name) in enumerate(INTERFERENCE_SETTINGS.items()):
        chosen = [[r for r in rows if (r["method"], r["setting"]) == (m, setting)] for m in methods]
        xs = [j + i * width for j in range(len(methods))]
        ax1.bar(xs, [100 * sum(r["exact_match"] for r in c) / len(c) for c in chosen], width, label=name)
        ax2.bar(xs, [sum(r["loss"] for r in c) / len(c) for c in chosen], width, label=name)
    base = [r["loss"] for r in rows if r["method"] == "base"]
    baseline = ax2.axhline(sum(base) / len(base), color="k", lw=0.8, ls="--", label="base model")
    ticks = ([j + 0.4 - width / 2 for j in range(len(methods))], [labels[m].replace(", ", "\n") for m in methods])
    for ax in (ax1, ax2):
        ax.set_xticks(*ticks, fontsize=7)
    ax1.set_ylabel("exact match, mean over tasks (%)")
    ax1.legend(fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylim(top=40)  # room above the base model's line for its legend (the bars' colours are ax1's)
    ax2.set_ylabel("response loss, mean over tasks (nats/token, log)")
    ax2.legend(handles=[baseline], fontsize=7, loc="upper left")
    continual = [r for r in rows if r["setting"] == "continual"]
    if continual:
        first, second = dict.fromkeys(r["task"] for r in continual)
        cell = {(r["method"], r["setting"], r["task"]): r for r in rows}
        bars = [
            ("single", first, f"{first} alone"),
            ("continual", first, f"{first} after {second}"),
            ("single", second, f"{second} alone"),
            ("continual", second, f"{second} after {first}"),
        ]
        shown = [m for m in methods if (m, "continual", first) in cell]
        width = 0.8 / len(bars)
        for i, (setting, task, name) in enumerate(bars):
            xs = [j + i * width for j in range(len(shown))]
            ax3.bar(xs, [100 * cell[(m, setting, task)]["exact_match"] for m in shown], width, label=name)
        ax3.set_xticks([j + 0.4 - width / 2 for j in range(len(shown))], [ticks[1][methods.index(m)] for m in shown])
        ax3.tick_params(axis="x", labelsize=7)
        ax3.set_ylabel("exact match (%)")
        ax3.set_title("continual learning", fontsize=9)
        ax3.legend(fontsize=7)
    ax1.set_title("single task, alone at merge weight, merged", fontsize=9)
    ax2.set_title("the same, response loss", fontsize=9)
    where = f"{label}: {rows[0]['device']}, commit {rows[0]['commit']}, {rows[0]['date']}"
    fig.suptitle(f"Interference on toy tasks, {where}", fontsize=10)
    return fig


def serving_figure(rows: list[dict], memory: list[dict], label: str):
    """The adapter path of prefill and of decode against the number of adapters N, LoRI's and
    PEFT's; with ``memory`` (the ``serving_memory`` rows), the bytes of the N adapters per model
    beside 4 PEFT adapters'. Titled with ``label`` (CPU or GPU) and the rows' own device and
    commit (the suite runs apart from the others)."""
    from matplotlib.figure import Figure

    colours = {"lori": "C0", "peft": "C1"}
    ns = sorted({r["n_adapters"] for r in rows + memory})
    fig = Figure(figsize=(14 if memory else 10, 4.2))
    axes = fig.subplots(1, 3 if memory else 2)
    for ax, phase in zip(axes, ("prefill", "decode"), strict=False):
        chosen = [r for r in rows if r["phase"] == phase]
        for impl, (name, how) in SERVING_IMPLS.items():
            line = sorted((r for r in chosen if r["impl"] == impl), key=lambda r: r["n_adapters"])
            xs, ys = [r["n_adapters"] for r in line], [r["ms_adapter_path"] for r in line]
            ax.plot(xs, ys, "o-", c=colours[impl], label=f"{name}, {how}")
        ax.set_ylim(bottom=0)
        ax.set_ylabel("adapter path: forward − base forward (ms)")
        ax.set_title(_phase_name(chosen[0]), fontsize=9)
        ax.legend(fontsize=7)
    if memory:
        ax = axes[2]
        for model, style in zip(dict.fromkeys(r["model"] for r in memory), ("-", "--", ":"), strict=False):
            for impl, (name, _) in SERVING_IMPLS.items():
                line = [r for r in memory if (r["model"], r["impl"]) == (model, impl)]
                xs, ys = [r["n_adapters"] for r in line], [r["adapter_bytes"] / 1e6 for r in line]
                ax.plot(xs, ys, "o" + style, c=colours[impl], label=f"{name}, {model}")
            fours = next(r for r in memory if (r["model"], r["impl"], r["n_adapters"]) == (model, "peft", 4))
            ax.axhline(fours["adapter_bytes"] / 1e6, color="grey", lw=0.8, ls=style, label=f"4 PEFT adapters, {model}")
        ax.set_yscale("log")
        ax.set_ylim(top=max(r["adapter_bytes"] for r in memory) / 1e6 * 1e2)  # room above the lines for the legend
        ax.set_ylabel("MB of the N adapters (log)")
        ax.set_title(f"adapter memory, r {rows[0]['r']}, {rows[0]['dtype']} (computed)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("adapters in the batch, N")
    where = f"{label}: {rows[0]['device']}, commit {rows[0]['commit']}, {rows[0]['date']}"
    fig.suptitle(f"Serving N adapters in one batch of {rows[0]['rows']} rows, {where}", fontsize=10)
    return fig


def plots(results: Path = RESULTS, out: Path | None = None) -> list[Path]:
    """Write the PNG plots of every results table found under ``results`` into ``out``
    (default: ``results``); return their paths."""
    from matplotlib.figure import Figure

    written = []
    out = out or results
    out.mkdir(parents=True, exist_ok=True)

    def save(fig, name):
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=120)
        written.append(path)

    for device in DEVICES:
        label = "GPU" if device == "cuda" else "CPU"
        env = _environment(results, device)
        title = f"{label}: {env['device']}" if env else label
        kernels = [r for r in _load(results, "kernels", device) if r["part"] == "layer"]
        if kernels:
            by_case: dict[tuple, dict] = {}
            for r in kernels:
                by_case.setdefault(_case_key(r), {})[(r["pass"], r["impl"])] = r
            impls = [n for n in _impls(kernels) if n != "base"]
            centre = _centre(by_case)
            fig = Figure(figsize=(10, 4))
            ax1, ax2 = fig.subplots(1, 2)
            shapes = [k for k in by_case if k[2:] == centre[2:]]
            width = 0.8 / max(len(impls), 1)
            for i, n in enumerate(impls):
                ax1.bar(
                    [j + i * width for j in range(len(shapes))],
                    [by_case[k][("fwd+bwd", n)]["ratio"] for k in shapes],
                    width,
                    label=n,
                )
            ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], [f"{k[0]}×{k[1]}" for k in shapes])
            ax1.axhline(1.0, color="k", lw=0.8)
            ax1.set_ylabel("fwd+bwd time / base linear")
            ax1.set_title(f"by shape (M {centre[2]}, r {centre[3]}, sparsity {centre[4]}, {centre[5]})", fontsize=9)
            ax1.legend(fontsize=8)
            sweep = sorted((k for k in by_case if k[:4] == centre[:4] and k[5] == centre[5]), key=lambda k: k[4])
            for n in impls:
                ax2.plot([k[4] for k in sweep], [by_case[k][("fwd+bwd", n)]["ratio"] for k in sweep], "o-", label=n)
            ax2.axhline(1.0, color="k", lw=0.8)
            ax2.set_xlabel("sparsity of B")
            ax2.set_title(f"by sparsity ({centre[0]}×{centre[1]}, M {centre[2]}, r {centre[3]})", fontsize=9)
            fig.suptitle(f"LoRI layer forward + backward, {title}", fontsize=10)
            save(fig, f"kernels_{device}")
        model = _load(results, "memory_model", device)
        if model:
            fig = Figure(figsize=(10, 4))
            ax1, ax2 = fig.subplots(1, 2)
            zero = [r for r in model if r["dropout"] == 0]
            names = [r["variant"] for r in zero if r["variant"] != "base"]
            parts = (("trainable_bytes", "parameters"), ("grad_bytes", "gradients"), ("adamw_bytes", "AdamW state"))
            bottom = [0.0] * len(names)
            for key, label_ in parts:
                values = [r[key] / 1e6 for r in zero if r["variant"] != "base"]
                ax1.bar(names, values, bottom=bottom, label=label_)
                bottom = [b + v for b, v in zip(bottom, values, strict=True)]
            ax1.set_ylabel("MB")
            ax1.set_title("trainable state", fontsize=9)
            ax1.legend(fontsize=8)
            ax1.tick_params(axis="x", labelsize=8)
            dropouts = sorted({r["dropout"] for r in model})
            variants = list(dict.fromkeys(r["variant"] for r in model))
            by = {(r["variant"], r["dropout"]): r for r in model}
            width = 0.8 / len(dropouts)
            for i, d in enumerate(dropouts):
                xs = [j + i * width for j, v in enumerate(variants) if (v, d) in by]
                ys = [(by[(v, d)]["peak_bytes"] - by[(v, d)]["model_bytes"]) / 1e6 for v in variants if (v, d) in by]
                ax2.bar(xs, ys, width, label=f"dropout {d:g}")
            ax2.set_xticks([j + 0.4 - width / 2 for j in range(len(variants))], variants, fontsize=8)
            ax2.set_ylabel("MB")
            ax2.set_title("training step peak above the model's tensors", fontsize=9)
            ax2.legend(fontsize=8)
            fig.suptitle(f"Memory, Llama-shaped model, {title}", fontsize=10)
            save(fig, f"memory_{device}")
        storage = [r for r in _load(results, "storage", device) if r["r"] == 32]
        if storage:
            fig = Figure(figsize=(7, 4))
            ax = fig.subplots()
            names = [
                {"peft_lora": "PEFT LoRA", "lori_original": "orig. LoRI-S"}.get(
                    r["method"], f"ours s={r['sparsity']:g}" + (" 1×1" if r["block"] == "1x1" else "")
                )
                for r in storage
            ]
            ax.bar(names, [r["total_bytes"] / 1e6 for r in storage])
            ax.set_yscale("log")
            ax.set_ylabel("MB (log)")
            ax.tick_params(axis="x", labelsize=8, rotation=30)
            ax.set_title(f"Adapter checkpoint, {storage[0]['model']}, r 32, bf16", fontsize=10)
            save(fig, f"storage_{device}")
        interference = _load(results, "interference", device)
        if interference:
            save(interference_figure(interference, label), f"interference_{device}")
        serving = _load(results, "serving", device)
        if serving:
            save(serving_figure(serving, _load(results, "serving_memory", device), label), f"serving_{device}")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="results directory (default: benchmarks/results)")
    args = parser.parse_args(argv)
    plots(args.results)
    print(markdown(args.results))


if __name__ == "__main__":
    main()
