"""Memory: what a layer saves for backward, and what one training step of a Llama-shaped
model holds, for LoRI-S and LoRI-D against PEFT LoRA and the original LoRI code.

Table ``memory_layer``: bytes saved for backward by one layer (``saved_tensors_hooks``,
``lori_kernels.testing``; weights, parameters and index buffers left out), for each
implementation of the kernel suite's centre case, dropout 0 and 0.05; ``x_mr`` is the same
in units of ``M·r`` elements (LoRI's target: 1, dropout or not).

Table ``memory_model``: a ``transformers.LlamaConfig`` model built locally (never
downloaded), its q/k/v/o/gate/up/down projections adapted at r 32 (alpha 64):

  base           no adapter, the frozen model's own activations (the embedding output
                 requires grad so backward runs through every layer)
  peft_lora      PEFT LoRA (A and B trained, adapter weights float32: PEFT's default)
  lori_original  the original LoRI code's LoRI-S: PEFT LoRA, A frozen, dense B whose
                 gradient is multiplied by a 90%-sparse mask; dense AdamW state
  lori_d         LoRI-D: ``lori.get_lori_model`` with a dense B
  lori_s         LoRI-S: ``lori.get_lori_model`` with random 90%-sparse block masks

each with dropout 0 and 0.05. Columns: trainable parameters, their bytes, their gradients'
bytes, AdamW's state bytes (after a step), bytes saved for backward by the whole forward
(activations, not weights), the bytes of the model's own tensors, and the peak of one
training step (forward, backward, AdamW step), measured after a warm-up step:

- GPU: ``torch.cuda.max_memory_allocated`` (everything the caching allocator handed out);
- CPU: the peak of the live tensor storages, followed by a ``TorchDispatchMode`` that sees
  every tensor an operator returns and is told when its storage is freed (tracemalloc does
  not see torch's allocations). It counts the model, the optimizer state and every tensor
  an operator returns; it does not count scratch memory a kernel frees before it returns
  nor the allocator's own overhead.

CPU model: Llama-3-8B's proportions / 4 (hidden 1024, MLP 3584, 8 + 2 heads of 128),
2 layers, vocab 1024, 512 tokens, float32. GPU: Llama-3-8B's sizes, 2 layers, vocab 1024,
8192 tokens, bf16. The small vocabulary keeps the logits from dominating the peak.

Table ``memory_quantized``: LoRI-S (dropout 0) on the same model in bfloat16, its linear
layers but the head left in bfloat16 or quantized by ``lori.quantize_base`` (torchao int8,
int4, NF4; bitsandbytes NF4, LLM.int8): the model's bytes (a quantized weight by the tensors
it holds, scales included) and the peak of one training step. On the CPU the count sees
what a quantized layer's operators return (its dequantized weight included, where the layer
computes through torch ops), not what they allocate and free inside.

Table ``memory_loss``: the loss at Llama-3-8B's vocabulary (128,256) and width (4096), 8192
tokens, bf16: the peak of ``lori.train.loss.response_loss_sum`` and its backward (every
token a response token) over a model with no decoder layers (embedding, norm, output
layer: what remains is the loss), with the full logits (``chunk_tokens`` 0) and in chunks
of 1024 tokens (``lori train``'s default). GPU: ``torch.cuda.max_memory_allocated``. CPU:
the live-tensor peak on the ``meta`` device (no data, no time; every output of an operator
has its real size), which equals the peak on real CPU tensors (tests/test_benchmarks.py
checks that at a small size).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lori
from lori_kernels.testing import plain_tensors, saved_bytes, storage_bytes

from . import kernels
from .common import LLAMA3_8B, default_block, dtype_name, environment, lori_backends, random_block_mask

log = logging.getLogger(__name__)

RANK = 32
SPARSITY = 0.9
DROPOUTS = (0.0, 0.05)
VARIANTS = ("base", "peft_lora", "lori_original", "lori_d", "lori_s")


@dataclasses.dataclass(frozen=True)
class ModelCase:
    config: dict  # LlamaConfig arguments
    tokens: int
    dtype: torch.dtype


def model_case(device_type: str, quick: bool) -> ModelCase:
    common = dict(vocab_size=1024, num_hidden_layers=2, tie_word_embeddings=False)
    if quick:
        small = dict(hidden_size=128, intermediate_size=448, num_attention_heads=4, num_key_value_heads=1)
        return ModelCase({**common, **small, "vocab_size": 128, "num_hidden_layers": 1}, 32, torch.float32)
    if device_type == "cuda":
        return ModelCase({**common, **LLAMA3_8B}, 8192, torch.bfloat16)
    scaled = {k: v // 4 for k, v in LLAMA3_8B.items()}
    return ModelCase({**common, **scaled}, 512, torch.float32)


class LiveTensors(TorchDispatchMode):
    """Bytes of the live tensor storages: those registered with ``hold`` and every one an
    operator returns while the mode is on, until it is freed; ``peak`` is the most at once.
    ``meta`` tensors count only with ``meta=True``."""

    def __init__(self, meta: bool = False):
        super().__init__()
        self.meta = meta
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def hold(self, tensors) -> None:
        for t in tensors:
            for plain in plain_tensors(t):
                self._track(plain)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage._cdata, storage.nbytes()
        if key in self.live or size == 0:
            return
        self.live[key] = size
        self.now += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (self.meta or t.device.type != "meta"):
                self._track(t)
        return out


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def layer_rows(device: torch.device, backends: list[str] | None, env: dict, quick: bool) -> list[dict]:
    """Saved-for-backward bytes of one layer, every implementation, dropout 0 and 0.05."""
    shape = kernels.centre(device.type, quick=quick)
    rows = []
    for dropout in DROPOUTS:
        case = kernels.make_case(shape, device)
        mr = shape.m * shape.r * case["x"].element_size()
        impls = kernels.implementations(case, lori_backends(device, shape.dtype, backends), dropout)
        saved = {name: saved_bytes(impl.forward, exclude=impl.held) for name, impl in impls.items()}
        for name, size in saved.items():
            columns = {"dropout": dropout, "impl": name, "saved_bytes": size, "x_mr": round(size / mr, 3)}
            rows.append({**env, **shape.columns(), **columns})
        log.info(
            "saved for backward, %s, dropout %g: %s",
            shape,
            dropout,
            "  ".join(f"{name} {size / mr:g} M·r" for name, size in saved.items()),
        )
    return rows


def build_model(
    variant: str, case: ModelCase, dropout: float, device: torch.device, seed: int = 0, quantized: str | None = None
):
    """The model of ``variant`` (see the module's docstring) on ``device``, in train mode; its
    linear layers but the head quantized to ``quantized`` (``lori.quantize_base``) if given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**case.config, max_position_embeddings=max(case.tokens, 64))
    with torch.device(device):
        model = LlamaForCausalLM(config).to(case.dtype)
    targets = list(lori.DEFAULT_TARGET_MODULES)
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets
    }
    g = torch.Generator().manual_seed(seed)
    block = default_block(RANK)
    masks = {n: random_block_mask(m.out_features, RANK, block, SPARSITY, g) for n, m in linears.items()}
    if variant == "base":
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_())
    elif variant in ("peft_lora", "lori_original"):
        import peft

        config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, lora_dropout=dropout)
        model = peft.get_peft_model(model, config)
        if variant == "lori_original":
            for name, module in model.base_model.model.named_modules():
                if name in masks:
                    module.lora_A["default"].weight.requires_grad_(False)
                    mask = masks[name].to(device)
                    module.lora_B["default"].weight.register_hook(lambda grad, mask=mask: grad * mask)
    else:
        lori_config = lori.LoRIConfig(r=RANK, block=block, dropout=dropout, seed=seed)
        model = lori.get_lori_model(model, lori_config, masks=masks if variant == "lori_s" else None)
    if quantized is not None:
        lori.quantize_base(model, quantized)
    return model.train()


@dataclasses.dataclass
class Training:
    """A model of one variant, its batch and its AdamW (None when nothing trains)."""

    model: torch.nn.Module
    ids: torch.Tensor
    optimizer: torch.optim.Optimizer | None

    def loss(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, labels=self.ids).loss

    def step(self) -> None:
        """Forward, backward, AdamW step; the gradients are dropped afterwards."""
        self.loss().backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def optimizer_state(self) -> list[torch.Tensor]:
        states = self.optimizer.state.values() if self.optimizer is not None else ()
        return [t for state in states for t in state.values() if torch.is_tensor(t)]


def training(
    variant: str, case: ModelCase, dropout: float, device: torch.device, quantized: str | None = None
) -> Training:
    model = build_model(variant, case, dropout, device, quantized=quantized)
    ids = torch.randint(0, case.config["vocab_size"], (1, case.tokens), generator=torch.Generator().manual_seed(1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0) if trainable else None
    return Training(model, ids.to(device), optimizer)


def model_row(
    variant: str, case: ModelCase, dropout: float, device: torch.device, quantized: str | None = None
) -> dict:
    """One training step of ``variant`` (over a base quantized to ``quantized``): trainable,
    gradient, AdamW and saved bytes, peak."""
    run = training(variant, case, dropout, device, quantized)
    trainable = run.trainable()
    run.loss().backward()  # warm-up: gradients, then AdamW's state, exist afterwards
    grad_bytes = tensor_bytes(p.grad for p in trainable)
    if run.optimizer is not None:
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    state = run.optimizer_state()
    weights = [t for w in (*run.model.parameters(), *run.model.buffers()) for t in plain_tensors(w)]
    saved = saved_bytes(run.loss, exclude=weights)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run.step()
        torch.cuda.synchronize(device)
        peak, method = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    else:
        with LiveTensors() as tracker:
            tracker.hold([*weights, *state, run.ids])
            run.step()
        peak, method = tracker.peak, "live_tensor_storages"
    return {
        "variant": variant,
        "dropout": dropout,
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_bytes": tensor_bytes(trainable),
        "grad_bytes": grad_bytes,
        "adamw_bytes": tensor_bytes(state),
        "saved_bytes": saved,
        "model_bytes": storage_bytes(weights),
        "peak_bytes": peak,
        "peak_method": method,
    }


def _case_columns(case: ModelCase) -> dict:
    return {
        "hidden": case.config["hidden_size"],
        "intermediate": case.config["intermediate_size"],
        "layers": case.config["num_hidden_layers"],
        "vocab": case.config["vocab_size"],
        "tokens": case.tokens,
        "r": RANK,
        "sparsity": SPARSITY,
        "dtype": dtype_name(case.dtype),
    }


def model_rows(device: torch.device, env: dict, quick: bool) -> list[dict]:
    case = model_case(device.type, quick)
    columns = _case_columns(case)
    rows = []
    for dropout in DROPOUTS:
        for variant in VARIANTS:
            if variant == "base" and dropout:
                continue
            row = {**env, **columns, **model_row(variant, case, dropout, device)}
            rows.append(row)
            log.info(
                "%s dropout %g: trainable %d (+grads, AdamW %.1f MB), saved %.1f MB, peak %.1f MB",
                variant,
                dropout,
                row["trainable_params"],
                (row["trainable_bytes"] + row["grad_bytes"] + row["adamw_bytes"]) / 1e6,
                row["saved_bytes"] / 1e6,
                row["peak_bytes"] / 1e6,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def quantized_rows(device: torch.device, env: dict, quick: bool) -> list[dict]:
    """LoRI-S's training step (dropout 0) over the model case's base in bfloat16 and quantized
    to each of ``lori.QUANTIZED_KINDS``: table ``memory_quantized``."""
    case = dataclasses.replace(model_case(device.type, quick), dtype=torch.bfloat16)
    rows = []
    for base in ("bfloat16", *lori.QUANTIZED_KINDS):
        library = "bitsandbytes" if base.startswith("bnb_") else "torchao"
        if base != "bfloat16" and importlib.util.find_spec(library) is None:
            log.warning("%s is not installed: no %s row (pip install 'lori-kernels[quant]')", library, base)
            continue
        row = model_row("lori_s", case, 0.0, device, quantized=None if base == "bfloat16" else base)
        rows.append({**env, **_case_columns(case), "base": base, **row})
        log.info(
            "lori_s over a %s base: model %.1f MB, peak %.1f MB",
            base,
            row["model_bytes"] / 1e6,
            row["peak_bytes"] / 1e6,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


LOSS_CHUNKS = (0, 1024)  # full logits, lori train's default --loss-chunk-tokens


def loss_peak(vocab: int, hidden: int, tokens: int, dtype: torch.dtype, chunk_tokens: int, device: torch.device) -> int:
    """Peak bytes, beyond the model's own tensors, of ``response_loss_sum`` and its backward
    over a Llama with no decoder layers (a frozen base; the embedding's output requires grad
    so that backward runs), ``tokens`` response tokens, on ``device`` ("meta": counted by
    ``LiveTensors``; "cuda": ``max_memory_allocated``; "cpu": ``LiveTensors``)."""
    import torch.fx.experimental._config as fx_config
    from transformers import LlamaConfig, LlamaForCausalLM

    from lori.train.loss import response_loss_sum

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden,
        num_hidden_layers=0,
        num_attention_heads=1,
        max_position_embeddings=tokens,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_())
    ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
    batch = dict(input_ids=ids, attention_mask=None, labels=ids)
    own = [*model.parameters(), *model.buffers(), ids]
    # The response positions are selected by a boolean mask (nonzero): on meta its size is
    # unknown unless every position is assumed chosen, which every one here is.
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            held = torch.cuda.memory_allocated(device)
            response_loss_sum(model, batch, chunk_tokens).backward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - held
        with LiveTensors(meta=device.type == "meta") as tracker:
            tracker.hold(own)
            held = tracker.now
            response_loss_sum(model, batch, chunk_tokens).backward()
        return tracker.peak - held


def loss_rows(device: torch.device, env: dict, quick: bool) -> list[dict]:
    vocab, hidden, tokens = (4096, 64, 2048) if quick else (128256, LLAMA3_8B["hidden_size"], 8192)
    where = device if device.type == "cuda" else torch.device("meta")
    method = "cuda_max_memory_allocated" if device.type == "cuda" else "live_tensor_storages_on_meta"
    rows = []
    for chunk in LOSS_CHUNKS:
        peak = loss_peak(vocab, hidden, tokens, torch.bfloat16, chunk, where)
        rows.append(
            {
                **env,
                "vocab": vocab,
                "hidden": hidden,
                "tokens": tokens,
                "dtype": "bfloat16",
                "loss_chunk_tokens": chunk,
                "peak_bytes": peak,
                "peak_method": method,
            }
        )
        log.info("loss, vocab %d, %d tokens, chunks of %s: peak %.1f MB", vocab, tokens, chunk or "all", peak / 1e6)
    return rows


def run(device: torch.device, *, quick: bool = False, full: bool = False, backends: list[str] | None = None) -> dict:
    """The memory suite on ``device``: tables ``memory_layer``, ``memory_model``, ``memory_quantized``
    and ``memory_loss``."""
    env = environment(device)
    return {
        "memory_layer": layer_rows(device, backends, env, quick),
        "memory_model": model_rows(device, env, quick),
        "memory_quantized": quantized_rows(device, env, quick),
        "memory_loss": loss_rows(device, env, quick),
    }
