"""Prompt/response data: local json/jsonl/parquet files (bad rows refused by file, line and
field), chat templates, response-only labels."""

import json

import pytest
import torch

from lori import toy
from lori.data import IGNORE_INDEX, DataError, collate, load_examples, tokenize_example


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
    with pytest.raises(DataError, match="has no 'prompt' field"):
        load_examples(path)
    with pytest.raises(DataError, match="must end in one of"):
        load_examples(path.rename(tmp_path / "qa.csv"))
    with pytest.raises(FileNotFoundError, match="no data file"):
        load_examples(tmp_path / "missing.jsonl")


GOOD = {"prompt": "abc", "response": "bcd"}


def _refused(path, *parts):
    """``load_examples(path)`` raises a DataError naming the file and every one of ``parts``."""
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for part in (str(path), *parts):
        assert part in message, f"{part!r} not in {message!r}"
    return message


def test_jsonl_blank_lines_extra_fields_empty_strings(tmp_path):
    rows = [GOOD, {"prompt": "", "response": "", "id": 7}, {"prompt": "é\u2028", "response": "x"}]
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]  # a raw U+2028 must not split a line
    path.write_text("\n" + lines[0] + "\r\n  \n" + "\n".join(lines[1:]) + "\n\n", encoding="utf-8")
    assert load_examples(path) == [{"prompt": r["prompt"], "response": r["response"]} for r in rows]


def test_json_array_and_json_lines_forms(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps([GOOD, GOOD], indent=2), encoding="utf-8-sig")  # with a byte-order mark
    assert load_examples(array) == [GOOD, GOOD]
    lines = toy.write_jsonl([GOOD, GOOD, GOOD], tmp_path / "lines.json")
    assert load_examples(lines) == [GOOD] * 3
    one = toy.write_jsonl([GOOD], tmp_path / "one.json")
    assert load_examples(one) == [GOOD]


@pytest.mark.parametrize(
    "row, field, kind",
    [
        ({"response": "x"}, "'prompt'", "has no 'prompt' field"),
        ({"prompt": "x"}, "'response'", "has no 'response' field"),
        ({"prompt": None, "response": "x"}, "'prompt'", "is null"),
        ({"prompt": "x", "response": ["a", "b"]}, "'response'", "is an array"),
        ({"prompt": 3, "response": "x"}, "'prompt'", "is a number"),
        ({"prompt": "x", "response": {"text": "y"}}, "'response'", "is an object"),
        ({"prompt": True, "response": "x"}, "'prompt'", "is a boolean"),
    ],
)
def test_jsonl_row_without_a_string_field_is_refused(tmp_path, row, field, kind):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(row) + "\n" + json.dumps(GOOD) + "\n")
    _refused(path, "line 3", field, kind)


def test_custom_field_names_are_the_ones_named(tmp_path):
    path = toy.write_jsonl([{"q": "a", "a": "b"}, {"q": "a", "a": None}], tmp_path / "qa.jsonl")
    with pytest.raises(DataError, match=r"line 2: field 'a' is null"):
        load_examples(path, prompt_field="q", response_field="a")


def test_malformed_json_line_names_its_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + '{"prompt": "a", "response": \n')
    _refused(path, "line 3", "not valid JSON")
    lines = tmp_path / "data.json"  # JSON-lines form in a .json file
    lines.write_text(json.dumps(GOOD) + "\n" + "{'prompt': 'a'}\n")
    _refused(lines, "line 2", "not valid JSON")


@pytest.mark.parametrize("text", ["", "\n  \n\t\r\n", "[]", "[\n]\n"])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_file_without_examples_is_refused(tmp_path, text, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text(text)
    if suffix == ".jsonl" and text == "[]":
        _refused(path, "line 1", "is an array, not an object")
    elif suffix == ".jsonl" and text.startswith("["):
        _refused(path, "one JSON value spread over several lines; expected one object per line")
    else:
        _refused(path, "holds no examples")


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9", "response": "x"}\n')
    _refused(path, "line 2", "not UTF-8", "0xe9")


def test_json_array_with_a_bad_item_names_the_item(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, GOOD, {"prompt": "x", "response": None}], indent=2))
    _refused(path, "item 3", "'response'", "is null")
    path.write_text(json.dumps([GOOD, "just text"]))
    _refused(path, "item 2", "is a string, not an object")
    path.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "a" "response": "b"}\n]')
    _refused(path, "not valid JSON at line 3 column")


@pytest.mark.parametrize(
    "suffix, text, parts",
    [
        (".jsonl", '["a", "b"]\n', ["line 1", "is an array, not an object with 'prompt' and 'response'"]),
        (".jsonl", json.dumps(GOOD) + '\n"text"\n', ["line 2", "is a string, not an object"]),
        (".jsonl", json.dumps(GOOD) + "\n42\n", ["line 2", "is a number, not an object"]),
        (".jsonl", "null\n", ["line 1", "is null, not an object"]),
        (".json", '"just a string"', ["line 1", "is a string, not an object"]),
        (".json", json.dumps({"prompt": ["a"], "response": ["b"]}, indent=2), ["one JSON value spread over"]),
    ],
)
def test_row_that_is_not_an_object_is_refused(tmp_path, suffix, text, parts):
    path = tmp_path / f"data{suffix}"
    path.write_text(text)
    _refused(path, *parts)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_deeply_nested_json_is_refused(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text(json.dumps(GOOD) + "\n" + "[" * 100_000 + "\n" if suffix == ".jsonl" else "[" * 100_000)
    message = _refused(path, "nested too deeply")
    if suffix == ".jsonl":
        assert "line 2" in message


def test_parquet_with_a_null_or_non_string_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", None], "response": ["x", "y", "z"], "id": [1, 2, 3]}), path)
    _refused(path, "row 3", "'prompt'", "is null")
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": [1, 2]}), path)
    _refused(path, "row 1", "'response'", "is a number")
    pq.write_table(pa.table({"prompt": ["a"], "answer": ["b"]}), path)
    _refused(path, "row 1", "has no 'response' field")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}), path)
    _refused(path, "holds no examples")
    path.write_bytes(b"")
    _refused(path, "not a readable parquet file")
    path.write_bytes(b"prompt,response\na,b\n")
    _refused(path, "not a readable parquet file")


def test_parquet_good_rows_with_extra_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["a", ""], "response": ["b", "c"]}), path)
    assert load_examples(path) == [{"prompt": "a", "response": "b"}, {"prompt": "", "response": "c"}]


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
