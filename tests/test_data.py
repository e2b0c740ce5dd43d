"""Prompt/response data: local files through datasets, chat templates, response-only labels."""

import json

import pytest
import torch

from lori import toy
from lori.data import IGNORE_INDEX, collate, load_examples, tokenize_example


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    toy.build_tokenizer(path)
    return path


@pytest.fixture
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_local_files_of_every_format(tmp_path, suffix):
    examples = toy.caesar_examples(5, 2, seed=0)
    path = tmp_path / f"data{suffix}"
    if suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(examples).to_parquet(str(path))
    elif suffix == ".json":
        path.write_text(json.dumps(examples))
    else:
        toy.write_jsonl(examples, path)
    assert load_examples(path) == examples


def test_custom_fields_and_errors(tmp_path):
    path = toy.write_jsonl([{"q": "abc", "a": "bcd"}], tmp_path / "qa.jsonl")
    assert load_examples(path, prompt_field="q", response_field="a") == [{"prompt": "abc", "response": "bcd"}]
    with pytest.raises(ValueError, match="has no 'prompt' field"):
        load_examples(path)
    with pytest.raises(ValueError, match="must end in one of"):
        load_examples(path.rename(tmp_path / "qa.csv"))
    with pytest.raises(FileNotFoundError, match="no data file"):
        load_examples(tmp_path / "missing.jsonl")


def test_chat_template_and_response_only_labels(tokenizer):
    item = tokenize_example(tokenizer, {"prompt": "abc", "response": "xyz"}, 64)
    text = tokenizer.decode(item["input_ids"])
    assert text == "<s>Q:abc\nA:xyz</s>"
    answer = [t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "xyz</s>"


def test_without_chat_template_eos_ends_the_response(tokenizer):
    plain = tokenizer
    plain.chat_template = None
    item = tokenize_example(plain, {"prompt": "ab", "response": "cd"}, 64)
    assert plain.decode(item["input_ids"]) == "<s>abcd</s>"
    assert item["labels"][:3] == [IGNORE_INDEX] * 3 and item["labels"][-1] == plain.eos_token_id


def test_truncation_and_padding(tokenizer):
    items = [
        tokenize_example(tokenizer, e, 8)
        for e in ({"prompt": "abcdef", "response": "ghijkl"}, {"prompt": "a", "response": "b"})
    ]
    assert len(items[0]["input_ids"]) == 8
    batch = collate(items, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][1].tolist() == [1] * len(items[1]["input_ids"]) + [0] * (
        8 - len(items[1]["input_ids"])
    )
    assert (batch["labels"][1, len(items[1]["input_ids"]) :] == IGNORE_INDEX).all()
    assert batch["input_ids"].dtype == torch.long
