"""``lori bench --suite serving``: many adapters in one batch, LoRI against PEFT's mixed batch.

A Llama-shaped model (CPU-sized: hidden 256, MLP 688, 2 layers, every projection adapted,
r 16, float32) and a batch of 64 rows whose adapters are drawn at random from N of them,
N ∈ {1, 4, 16, 64}:

- ``lori``: N LoRI-S adapters over one seed (90% of B's blocks dropped, blocks 32 x 16)
  loaded by name, run with ``lori.adapter_batch`` (per layer one shrink for all of them, then
  the segmented expand over their kept blocks);
- ``peft``: N PEFT LoRA adapters of the same rank and dtype, run with ``adapter_names=``
  (each adapter's own A and B over its sub-batch).

Per phase (``prefill``: a forward of 128 tokens per row; ``decode``: one token per row on a KV
cache of 16 tokens) the whole forward is timed beside the same model with its adapters off,
in the same process, interleaved; their difference is the adapter path. ``adapter_bytes``:
the memory of the N adapters' tensors (LoRI: seeds, kept blocks and their indices; PEFT: A and
B). Rows: ``serving_<device>.csv``.

``serving_memory_<device>.csv``: the same bytes computed from the shapes and the kept-block
count, no model built, for this model and for Llama-3-8B's (32 layers), where the projections
are tall enough for 90% of their blocks to be dropped (here k and v are 2 block rows, and one
is kept).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import random

import torch

from lori.bench.common import LLAMA3_8B, environment, kept_blocks, median_ms_each, random_block_mask, synced
from lori.config import DEFAULT_TARGET_MODULES
from lori_kernels.block_sparse import block_grid

log = logging.getLogger(__name__)

MODEL = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
TARGETS = DEFAULT_TARGET_MODULES  # the seven projections of a Llama layer
R, BLOCK, SPARSITY = 16, (32, 16), 0.9
ROWS, PREFILL_TOKENS, CACHE_TOKENS = 64, 128, 16
N_ADAPTERS = (1, 4, 16, 64)
ROUNDS = 7  # interleaved timing rounds: a prefill is ~0.5 s on a CPU, one run per round
MEMORY_MODELS = {"CPU-sized": MODEL, "Llama-3-8B": dict(LLAMA3_8B, num_hidden_layers=32)}


def _base(device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**MODEL)).to(device).eval()


def lori_model(n: int, device: torch.device):
    """The base with ``n`` LoRI-S adapters ``task0``... over one seed (random kept blocks and
    values), loaded by name beside each other; and their bytes."""
    import lori
    from lori.adapters import add_adapter
    from lori_kernels import block_sparse

    g = torch.Generator().manual_seed(1)
    base = _base(device)
    config = lori.LoRIConfig(r=R, block=BLOCK, seed=0, target_modules=TARGETS, sparsity=SPARSITY)
    targets = {
        name: m.out_features
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    }

    def sparse_b(out):
        mask = random_block_mask(out, R, BLOCK, SPARSITY, g)
        return block_sparse.from_dense(torch.randn(out, R, generator=g) * 0.01 * mask, BLOCK, mask)

    first = {name: sparse_b(out) for name, out in targets.items()}
    masks = {
        name: block_sparse.mask_from_blocks(b_blocks, targets[name], R, BLOCK) for name, (_, b_blocks) in first.items()
    }
    model = lori.get_lori_model(base, config, masks)
    layers = lori.lori_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.b_values.copy_(first[name][0])
            layer.adapter_name = layer.active_adapter = "task0"
    for k in range(1, n):
        tensors = {}
        for name, layer in layers.items():
            b_values, b_blocks = sparse_b(layer.out_features)
            tensors[name] = dict(seed=layer.seed, b_values=b_values, b_blocks=b_blocks)
        add_adapter(model, f"task{k}", config, tensors, "the benchmark")
    adapter_bytes = sum(
        t.nbytes
        for layer in layers.values()
        for a in layer.named_adapters().values()
        for t in (a.seed, a.b_values, a.b_blocks)
    )
    return model, adapter_bytes


def peft_model(n: int, device: torch.device):
    """The base with ``n`` PEFT LoRA adapters ``task0``... (random A and B); and their bytes."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R, lora_alpha=2 * R, target_modules=list(TARGETS), init_lora_weights=False)
    model = get_peft_model(_base(device), config, adapter_name="task0")
    for k in range(1, n):
        model.add_adapter(f"task{k}", config)
    model.eval()
    adapter_bytes = sum(p.nbytes for name, p in model.named_parameters() if "lora_" in name)
    return model, adapter_bytes


def projections(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each adapted projection of a Llama layer of ``config`` (its hidden and MLP
    sizes, query and key/value heads)."""
    hidden, mlp = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    return dict(
        q_proj=(hidden, hidden),
        k_proj=(hidden, kv),
        v_proj=(hidden, kv),
        o_proj=(hidden, hidden),
        gate_proj=(hidden, mlp),
        up_proj=(hidden, mlp),
        down_proj=(mlp, hidden),
    )


def adapter_bytes(config: dict, impl: str, n: int) -> int:
    """Bytes of ``n`` adapters on every projection of a model of ``config``, as loaded, from the
    shapes alone: ``lori`` per layer a seed (int64), its kept blocks' values (float32, whole
    blocks) and indices (int32 ``[nnz, 2]``); ``peft`` A ``[R, in]`` and B ``[out, R]`` (float32)."""
    bo, br = BLOCK
    if impl == "lori":
        per_layer = sum(
            8 + kept_blocks(out, R, BLOCK, SPARSITY) * (bo * br * 4 + 2 * 4) for _, out in projections(config).values()
        )
    else:
        per_layer = sum(R * (d_in + out) * 4 for d_in, out in projections(config).values())
    return n * config["num_hidden_layers"] * per_layer


def memory_rows(env: dict) -> list[dict]:
    """The ``serving_memory`` rows: the bytes of N adapters of each implementation, computed
    for each of ``MEMORY_MODELS``."""
    rows = []
    for model, config in MEMORY_MODELS.items():
        layers, outs = config["num_hidden_layers"], [out for _, out in projections(config).values()]
        blocks = {
            "lori": dict(
                block="x".join(map(str, BLOCK)),
                sparsity=SPARSITY,
                kept_blocks=layers * sum(kept_blocks(out, R, BLOCK, SPARSITY) for out in outs),
                blocks=layers * sum(math.prod(block_grid(out, R, BLOCK)) for out in outs),
            ),
            "peft": dict(block="", sparsity=0.0, kept_blocks="", blocks=""),
        }
        for n in N_ADAPTERS:
            for impl in ("lori", "peft"):
                rows.append(
                    dict(
                        env,
                        model=model,
                        layers=layers,
                        hidden=config["hidden_size"],
                        intermediate=config["intermediate_size"],
                        impl=impl,
                        n_adapters=n,
                        r=R,
                        **blocks[impl],
                        dtype="float32",
                        adapter_bytes=adapter_bytes(config, impl, n),
                    )
                )
    return rows


def _inputs(device: torch.device, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, MODEL["vocab_size"], (ROWS, tokens), generator=g).to(device)


def _phases(model, base, device: torch.device, **kwargs) -> dict[str, dict]:
    """For each phase, its forward through ``model`` (with ``kwargs``) and through ``base``,
    the same model without adapters."""
    prefill_ids, prompt, step = (_inputs(device, t, k) for k, t in enumerate((PREFILL_TOKENS, CACHE_TOKENS, 1)))
    fns = {}
    for name, m, kw in (("forward", model, kwargs), ("base", base, {})):
        with torch.no_grad():
            cache = m(prompt, use_cache=True, **kw).past_key_values

        def prefill(m=m, kw=kw):
            with torch.no_grad():
                m(prefill_ids, use_cache=False, **kw)

        def decode(m=m, kw=kw, cache=cache):
            with torch.no_grad():
                m(step, past_key_values=cache, use_cache=True, **kw)
            cache.crop(-1)  # drop the token it added: the next call decodes the same position again

        fns[name] = {"prefill": synced(device, prefill), "decode": synced(device, decode)}
    return {phase: {name: fns[name][phase] for name in fns} for phase in ("prefill", "decode")}


def _time(fns: dict, device: torch.device, quick: bool) -> dict:
    return median_ms_each(fns, device, quick=quick, rounds=3 if quick else ROUNDS)


def run(device: torch.device, *, quick: bool = False, full: bool = False, backends: list[str] | None = None) -> dict:
    """Rows of every N and implementation, both phases; ``full`` and ``backends`` are not used
    (LoRI runs on the device's ``"auto"`` backend)."""
    import lori

    env = environment(device)
    base = _base(device)
    rows = []
    impls = ("lori", "peft")
    if importlib.util.find_spec("peft") is None:
        log.warning("peft is not installed: the PEFT mixed-batch rows are left out")
        impls = ("lori",)
    for n in N_ADAPTERS[:2] if quick else N_ADAPTERS:
        names = [f"task{k}" for k in random.Random(n).choices(range(n), k=ROWS)]
        for impl in impls:
            if impl == "lori":  # the batch's adapters are packed once, as a server does per batch
                model, adapter_bytes = lori_model(n, device)
                with lori.adapter_batch(model, names):
                    times = {p: _time(f, device, quick) for p, f in _phases(model, base, device).items()}
            else:  # PEFT's mixed batch: adapter_names= on every call
                model, adapter_bytes = peft_model(n, device)
                phases = _phases(model, base, device, adapter_names=names)
                times = {p: _time(f, device, quick) for p, f in phases.items()}
            for phase, t in times.items():
                rows.append(
                    dict(
                        env,
                        impl=impl,
                        phase=phase,
                        n_adapters=n,
                        rows=ROWS,
                        tokens_per_row=PREFILL_TOKENS if phase == "prefill" else 1,
                        r=R,
                        block="x".join(map(str, BLOCK)) if impl == "lori" else "",
                        sparsity=SPARSITY if impl == "lori" else 0.0,
                        dtype="float32",
                        ms_forward=round(t["forward"], 4),
                        ms_base=round(t["base"], 4),
                        ms_adapter_path=round(t["forward"] - t["base"], 4),
                        adapter_bytes=adapter_bytes,
                    )
                )
                log.info("serving %s %s N=%d: adapter path %.3f ms", impl, phase, n, rows[-1]["ms_adapter_path"])
    return {"serving": rows, "serving_memory": memory_rows(env)}
