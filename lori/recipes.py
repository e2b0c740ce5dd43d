"""Named sets of defaults. ``lori``: the library's own. ``paper``: the original LoRI code's
(github juzhengz/LoRI, whose runs the paper reports), each difference with its reason in
the README's recipe section:

- element masks, block (1, 1) — the library keeps whole (32, min(r, 32)) blocks, which the
  fast kernels need and which store in a third of the space;
- a constant learning rate (the original's ``min(1, (step+1)/(warmup+1))`` with warm-up 0)
  — the library decays it by a cosine after 3% of warm-up;
- each tensor's gradient clipped to norm 1 after masking (the original's optimizer steps
  each parameter alone, in backward) — the library clips one global norm, as HF's Trainer;
- the loss of a step: each sequence's summed response-token loss, averaged over the
  sequences — the library averages over the response tokens, so long answers do not weigh
  more and the step size does not depend on their length;
- masks keep ``int((1 - s) * N)`` entries by global magnitude and every entry tied with the
  last one — the library keeps ``round((1 - s) * N)``, ties broken by position, so the kept
  fraction is exact (the two differ by at most one entry where nothing ties).
"""

from __future__ import annotations

__all__ = ["MASK_RULES", "RECIPES", "recipe"]

RECIPES = {
    "lori": {"adapter": {}, "train": {}, "masks": {"rule": "exact"}},
    "paper": {
        "adapter": {"block": (1, 1)},
        "train": {
            "schedule": "constant",
            "warmup_ratio": 0.0,
            "clip_grad": 1.0,
            "clip_mode": "per_tensor",
            "loss_normalization": "sequence",
        },
        "masks": {"rule": "original", "block": (1, 1)},
    },
}
MASK_RULES = ("exact", "original")


def recipe(name: str) -> dict:
    """The defaults of recipe ``name``: ``{"adapter": LoRIConfig fields, "train": TrainConfig
    fields, "masks": extract_masks arguments}``."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]
