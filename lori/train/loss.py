"""The training loss of a causal LM without its full logits: the summed next-token cross
entropy over the response tokens, computed from the last hidden states ``chunk_tokens``
tokens at a time.

A full-vocabulary fp32 logits tensor for a micro-batch is the largest activation of LLM
fine-tuning (8k tokens x 128k vocabulary x 4 bytes = 4 GiB, plus its softmax gradient).
Here the model's output layer (``lm_head``) is run inside the model's own forward (so that
FSDP2 has its weight gathered) but on the response positions only and chunk by chunk:
each chunk's logits give its loss and, at once, the loss's gradient with respect to its
hidden states (softmax minus one-hot, times the weight), which backward scales by the
incoming gradient. The peak is one chunk's logits; nothing is recomputed. This is
Liger-Kernel's fused linear cross-entropy in plain torch, for a frozen output layer (LoRI
never trains it); any other output layer takes the full-logits path.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from lori.data import IGNORE_INDEX

log = logging.getLogger(__name__)

__all__ = ["response_loss_sum"]


class _ChunkedCrossEntropy(torch.autograd.Function):
    """``sum_i CE(hidden_i @ W.T + b, target_i)`` in chunks; its gradient with respect to
    ``hidden`` is computed in forward (the loss is the end of the graph) and scaled in
    backward. W and b are frozen."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = F.linear(hidden[rows], weight, bias).float()
            total += F.cross_entropy(logits, targets[rows], reduction="sum")
            if grad is not None:
                probs = logits.softmax(-1)
                probs[torch.arange(probs.shape[0], device=probs.device), targets[rows]] -= 1.0
                grad[rows] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


@contextlib.contextmanager
def _output_layer_computes_loss(head: nn.Linear, labels: torch.Tensor, chunk_tokens: int):
    """Within the block, ``head`` (the model's output layer) takes the last hidden states
    and returns the summed response-token loss instead of logits; yields a list that
    receives that loss."""
    computed = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        targets = labels[:, 1:]
        chosen = targets != IGNORE_INDEX
        computed.append(
            _ChunkedCrossEntropy.apply(hidden[:, :-1][chosen], head.weight, head.bias, targets[chosen], chunk_tokens)
        )
        return computed[-1]

    head.forward = forward
    try:
        yield computed
    finally:
        del head.forward  # the class's forward again


def response_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 0) -> torch.Tensor:
    """Summed next-token cross-entropy over the response tokens of ``batch`` (labels
    ``IGNORE_INDEX`` elsewhere), in float32. With ``chunk_tokens`` > 0 and a frozen
    ``nn.Linear`` output layer whose output the model returns as is, without
    materialising the full logits (module docstring); else from the model's logits. A
    model that transforms its logits (soft-capping, scaling) is noticed on its first
    batch, said once, and takes the full-logits path."""
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chunked = (
        chunk_tokens > 0
        and type(head) is nn.Linear
        and not any(p.requires_grad for p in head.parameters())
        and not getattr(model, "lori_full_logits", False)
    )
    if chunked:
        with _output_layer_computes_loss(head, batch["labels"], chunk_tokens) as computed:
            returned = model(**inputs).logits
        if computed and returned is computed[-1]:
            return returned
        model.lori_full_logits = True
        log.warning("%s transforms its logits after its output layer: the loss takes the full logits", type(model))
    logits = model(**inputs).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
