"""``lori demo``: the LoRI recipe on one layer, end to end on the CPU in seconds.

A frozen linear layer gets a hidden task: a teacher adapter that keeps 10% of B's blocks
under the layer's own seeded A. LoRI-D trains a dense B, the mask keeps the largest
blocks, LoRI-S retrains from zero under the mask. Every step reports its figures:
losses, whether the mask found the teacher's blocks, and what the sparse adapter costs
in parameters, saved activations and storage against a PEFT LoRA adapter.
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

import lori_kernels
from lori_kernels import block_sparse
from lori_kernels.saved_memory import saved_bytes

log = logging.getLogger(__name__)

__all__ = ["run_demo"]


def run_demo(
    *,
    in_features: int = 512,
    out_features: int = 768,
    r: int = 32,
    block: tuple[int, int] = (16, 8),
    sparsity: float = 0.9,
    tokens: int = 1024,
    steps: int = 150,
    lr: float = 0.05,
    dropout: float = 0.0,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = True,
) -> dict:
    """Run the demo and return its figures (also logged)."""
    gen = torch.Generator().manual_seed(seed)
    scaling = 2.0  # alpha = 2r, as in the LoRI recipe
    layer_seed = lori_kernels.layer_seed(seed, "demo.proj")
    figures: dict = {"backend": backend}

    # 1. A is regenerated from the seed, identically by every backend that can.
    a_by_backend = {
        b: lori_kernels.generate_a(layer_seed, r, in_features, backend=b)
        for b in lori_kernels.available_backends("generate_a")
    }
    a_ref = a_by_backend["reference"]
    figures["a_backends_identical"] = all(torch.equal(a, a_ref) for a in a_by_backend.values())
    log.info(
        "1. A [%d, %d] regenerated from layer seed %#018x by %s: bit-identical = %s",
        r, in_features, layer_seed, ", ".join(a_by_backend), figures["a_backends_identical"],
    )

    # The frozen base layer and a hidden teacher adapter keeping (1 - sparsity) of the blocks.
    weight = torch.randn(out_features, in_features, generator=gen) / math.sqrt(in_features)
    bias = torch.randn(out_features, generator=gen) * 0.1
    all_blocks = block_sparse.dense_blocks(out_features, r, block)
    n_keep = max(1, round((1 - sparsity) * all_blocks.shape[0]))
    chosen = torch.randperm(all_blocks.shape[0], generator=gen)[:n_keep].sort().values
    teacher_blocks = all_blocks[chosen]
    teacher_values = torch.randn(n_keep, *block, generator=gen)

    def layer(x, b_values, b_blocks, p=0.0, step=0):
        return lori_kernels.lori_linear(
            x, weight, bias, layer_seed, b_values, b_blocks, r=r, block=block, scaling=scaling,
            dropout_p=p, dropout_seed=layer_seed ^ step, backend=backend,
        )

    def data(n):
        x = torch.randn(n, in_features, generator=gen)
        y = layer(x, teacher_values, teacher_blocks)
        return x, y + 0.01 * torch.randn(y.shape, generator=gen)

    x_train, y_train = data(tokens)
    x_test, y_test = data(tokens // 4)

    def test_loss(b_values, b_blocks):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(layer(x_test, b_values, b_blocks), y_test).item()

    def train(b_blocks, stage):
        b_values = torch.zeros(b_blocks.shape[0], *block, requires_grad=True)
        opt = torch.optim.Adam([b_values], lr=lr)
        bar = tqdm(range(steps), desc=stage, disable=not progress, leave=False)
        for step in bar:
            loss = torch.nn.functional.mse_loss(
                layer(x_train, b_values, b_blocks, dropout, step), y_train
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        return b_values.detach()

    base_loss = test_loss(teacher_values.new_zeros(0, *block), all_blocks[:0])
    figures["test_loss_base"] = base_loss

    # 2. LoRI-D: every block of B trained.
    dense_values = train(all_blocks, "LoRI-D")
    figures["test_loss_lori_d"] = test_loss(dense_values, all_blocks)
    log.info(
        "2. LoRI-D (dense B, %d blocks, %d steps): test loss %.4f -> %.4f",
        all_blocks.shape[0], steps, base_loss, figures["test_loss_lori_d"],
    )

    # 3. Mask: keep the blocks of largest L2 norm (ties broken by position).
    scores = dense_values.flatten(1).norm(dim=1)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].item(), i))
    mask_blocks = all_blocks[sorted(order[:n_keep])]
    found = len({tuple(b) for b in mask_blocks.tolist()} & {tuple(b) for b in teacher_blocks.tolist()})
    figures["mask_recall"] = found / n_keep
    log.info(
        "3. Mask at sparsity %.0f%%: kept %d of %d blocks; %d of the teacher's %d found",
        100 * sparsity, n_keep, all_blocks.shape[0], found, n_keep,
    )

    # 4. LoRI-S: retrain from zero under the mask.
    sparse_values = train(mask_blocks, "LoRI-S")
    figures["test_loss_lori_s"] = test_loss(sparse_values, mask_blocks)
    log.info(
        "4. LoRI-S (%d blocks, %d steps): test loss %.4f -> %.4f",
        n_keep, steps, base_loss, figures["test_loss_lori_s"],
    )

    # 5. What the sparse adapter costs, against PEFT LoRA on the same layer (fp32).
    lora_params = r * (in_features + out_features)
    figures["trainable_params"] = sparse_values.numel()
    figures["trainable_params_lora"] = lora_params
    x = x_train[:256].clone().requires_grad_()
    b = sparse_values.clone().requires_grad_()
    a = a_ref.clone()  # frozen, as in LoRI
    b_dense = block_sparse.scatter_blocks(sparse_values, mask_blocks, out_features, r).requires_grad_()

    def peft_lora(p):  # PEFT's LoRA Linear forward: base + B(A(dropout(x))) * scaling
        h = torch.nn.functional.linear(torch.nn.functional.dropout(x, p), a)
        return torch.nn.functional.linear(x, weight, bias) + torch.nn.functional.linear(h, b_dense) * scaling

    frozen = (weight, bias, b, mask_blocks, a, b_dense)
    per_token = {
        name: saved_bytes(fn, frozen) / x.shape[0]
        for name, fn in {
            "base": lambda: torch.nn.functional.linear(x, weight, bias),
            "lori": lambda: layer(x, b, mask_blocks, 0.1),
            "lora": lambda: peft_lora(0.0),
            "lora_dropout": lambda: peft_lora(0.1),
        }.items()
    }
    for name in ("lori", "lora", "lora_dropout"):
        figures[f"saved_bytes_per_token_{name}"] = per_token[name] - per_token["base"]
    ckpt = 8 + sparse_values.numel() * 4 + mask_blocks.numel() * 4
    figures["adapter_bytes"] = ckpt
    figures["adapter_bytes_lora"] = 4 * lora_params
    log.info(
        "5. Trainable parameters %d (PEFT LoRA: %d, %.1f%%). Saved for backward beyond the "
        "base linear, per token: %.0f bytes with dropout 0.1 (PEFT LoRA: %.0f without dropout, "
        "%.0f with). Adapter: %d bytes = seed + blocks (PEFT LoRA: %d, %.1f%%)",
        figures["trainable_params"], lora_params, 100 * figures["trainable_params"] / lora_params,
        figures["saved_bytes_per_token_lori"], figures["saved_bytes_per_token_lora"],
        figures["saved_bytes_per_token_lora_dropout"], ckpt, figures["adapter_bytes_lora"],
        100 * ckpt / figures["adapter_bytes_lora"],
    )
    return figures
