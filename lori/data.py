"""Supervised fine-tuning data: prompt/response examples from local json, jsonl or parquet
files (through ``datasets``), tokenized with the chat template when the tokenizer has
one, and the loss on the response tokens only."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["IGNORE_INDEX", "collate", "load_examples", "tokenize_example", "tokenize_prompt"]

IGNORE_INDEX = -100
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_examples(path: str | Path, prompt_field: str = "prompt", response_field: str = "response") -> list[dict]:
    """``[{"prompt": ..., "response": ...}]`` from a local .json/.jsonl/.parquet file."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    builder = _BUILDERS.get(path.suffix)
    if builder is None:
        raise ValueError(f"data file {path} must end in one of {sorted(_BUILDERS)}")
    dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    for field in (prompt_field, response_field):
        if field not in dataset.column_names:
            raise ValueError(f"{path} has no {field!r} field (fields: {dataset.column_names})")
    return [{"prompt": str(row[prompt_field]), "response": str(row[response_field])} for row in dataset]


def tokenize_prompt(tokenizer, prompt: str) -> list[int]:
    """The token ids a response is generated after (chat template with the generation
    prompt when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    return list(tokenizer(prompt)["input_ids"])


def tokenize_example(tokenizer, example: dict, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (``IGNORE_INDEX`` on the prompt), cut to ``max_length``."""
    prompt_ids = tokenize_prompt(tokenizer, example["prompt"])
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["response"]},
        ]
        ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    else:
        ids = prompt_ids + list(tokenizer(example["response"], add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def collate(batch: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask``, ``labels`` (padding ignored)."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
