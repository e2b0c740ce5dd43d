"""Supervised fine-tuning data: prompt/response examples from local json, jsonl or parquet
files, tokenized with the chat template when the tokenizer has one, and the loss on the
response tokens only.

json and jsonl files are parsed here with the standard ``json`` module, so that a bad row
is reported by file and line (or, in a JSON array, by item); parquet files are read through
``datasets`` and a bad row is reported by its row number. Every row must be a JSON object
(a record) whose prompt and response fields are strings; empty strings are allowed and
extra fields are ignored. Anything else raises :class:`DataError`, naming the file, the
place and the field, rather than training on ``"None"`` or a printed list."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from lori.errors import LoRIError

__all__ = ["IGNORE_INDEX", "DataError", "collate", "load_examples", "tokenize_example", "tokenize_prompt"]

IGNORE_INDEX = -100
_SUFFIXES = (".json", ".jsonl", ".parquet")
_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}


class DataError(LoRIError, ValueError):
    """A data file that cannot be trained on: unreadable, empty, not JSON, or a row that is
    not an object with string prompt and response fields. The message names the file and,
    where it applies, the line (or item, or row) and the field."""


def load_examples(path: str | Path, prompt_field: str = "prompt", response_field: str = "response") -> list[dict]:
    """``[{"prompt": ..., "response": ...}]`` from a local .json/.jsonl/.parquet file.

    A .jsonl file holds one JSON object per line (blank lines are skipped); a .json file
    holds either one JSON array of objects or, like .jsonl, one object per line. Lines are
    numbered from 1, and so are array items and parquet rows. Raises
    :class:`FileNotFoundError` for a missing file and :class:`DataError` for everything
    else that is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    if path.suffix not in _SUFFIXES:
        raise DataError(f"data file {path} must end in one of {list(_SUFFIXES)}")
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _json_rows(path)
    examples = [_example(row, where, prompt_field, response_field) for where, row in rows]
    if not examples:
        raise DataError(f"data file {path} holds no examples")
    return examples


def _example(row, where: str, prompt_field: str, response_field: str) -> dict:
    """``{"prompt", "response"}`` from one row, or a :class:`DataError` naming ``where``."""
    if not isinstance(row, dict):
        raise DataError(f"{where} is {_kind(row)}, not an object with {prompt_field!r} and {response_field!r} fields")
    example = {}
    for key, field in (("prompt", prompt_field), ("response", response_field)):
        if field not in row:
            raise DataError(f"{where} has no {field!r} field (fields: {list(row)})")
        value = row[field]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {field!r} is {_kind(value)}, not a string")
        example[key] = value
    return example


def _kind(value) -> str:
    """What ``value`` is, in JSON's words: "null", "an array", "a number", ..."""
    if value is None:
        return "null"
    return _KINDS.get(type(value), f"a {type(value).__name__} value")


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    """``(where, row)`` for every row of a json/jsonl file: the items of a JSON array
    (a .json file whose first character is ``[``), otherwise one object per line."""
    text = _read_text(path)
    if path.suffix == ".json" and text.lstrip(" \t\r\n").startswith("["):
        items = _parse(text, path)
        return ((f"{path} item {i} (numbered from 1)", item) for i, item in enumerate(items, 1))
    return _json_lines(path, text)


def _json_lines(path: Path, text: str) -> Iterator[tuple[str, object]]:
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip(" \t\r"):
            continue
        try:
            row = _parse(line, path, number)
        except DataError:
            if _is_one_value(text):  # a pretty-printed object, or an array in a .jsonl file
                expected = "one object per line"
                if path.suffix == ".json":
                    expected = "a JSON array of objects, or " + expected
                raise DataError(f"{path} holds one JSON value spread over several lines; expected {expected}") from None
            raise
        yield f"{path} line {number}", row


def _parse(text: str, path: Path, line: int | None = None):
    """``json.loads(text)`` of the whole file, or of its line ``line``; a failure is a
    :class:`DataError` naming the file and the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        place = f"line {e.lineno} column {e.colno}" if line is None else f"line {line} column {e.colno}"
        raise DataError(f"{path} is not valid JSON at {place}: {e.msg}") from None
    except RecursionError:
        place = "" if line is None else f" line {line}"
        raise DataError(f"{path}{place} holds JSON nested too deeply to parse") from None


def _is_one_value(text: str) -> bool:
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark dropped), or a :class:`DataError`
    naming the line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}: {e.reason})"
        ) from None


def _parquet_rows(path: Path) -> Iterable[tuple[str, object]]:
    import datasets
    import pyarrow
    import pyarrow.parquet

    try:
        with pyarrow.parquet.ParquetFile(path) as file:
            if file.metadata.num_rows == 0:  # datasets fails on it with an unhelpful error
                return []
        dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except (pyarrow.ArrowException, datasets.exceptions.DatasetGenerationError) as e:
        cause = e.__cause__ or e
        raise DataError(f"{path} is not a readable parquet file ({type(cause).__name__}: {cause})") from e
    return ((f"{path} row {i} (numbered from 1)", row) for i, row in enumerate(dataset, 1))


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
