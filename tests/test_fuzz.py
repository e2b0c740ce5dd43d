"""Every loader fuzzed: a LoRI adapter, a masks file, an exported PEFT adapter and a
training checkpoint, each file damaged by truncation, byte flips, edits of the
safetensors header and edits of the JSON manifest. Every damaged copy either is refused
with the library's own error naming the file, or loads to exactly what the undamaged copy
gives. Nothing else."""

import json
import random
import shutil

import pytest
import torch
from test_model import randomize_b, tiny_model

import lori
from lori import LoRIConfig, toy
from lori.checkpoint import read_lori
from lori.errors import CheckpointError
from lori.masks import load_masks
from lori.peft_interop import read_peft
from lori.train import TrainConfig, read_checkpoint, train

TRIALS = 24  # per file and kind of damage


def truncate(data: bytes, rand: random.Random) -> bytes:
    return data[: rand.randrange(len(data))]


def flip(data: bytes, rand: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rand.randint(1, 3)):
        data[rand.randrange(len(data))] ^= 1 << rand.randrange(8)
    return bytes(data)


def edit_value(value, rand: random.Random):
    """A changed copy of one randomly chosen leaf of a JSON value (or a key added/removed)."""
    if isinstance(value, dict) and value:
        key = rand.choice(sorted(value))
        action = rand.random()
        if action < 0.15:
            return {k: v for k, v in value.items() if k != key}
        if action < 0.25:
            return {**value, "extra": 1}
        return {**value, key: edit_value(value[key], rand)}
    if isinstance(value, list) and value:
        i = rand.randrange(len(value))
        return value[:i] + [edit_value(value[i], rand)] + value[i + 1 :]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rand.choice([-1, 1, 7, -value, 2**40])
    if isinstance(value, float):
        return rand.choice([value * 2, -value, value + 1e-3, 0.0])
    if isinstance(value, str):
        return rand.choice([value + "x", value[:-1], "", "F16", "bfloat16"])
    return rand.choice([0, "x", None, [], {}])


def edit_json(data: bytes, rand: random.Random) -> bytes:
    return json.dumps(edit_value(json.loads(data), rand)).encode()


def edit_header(data: bytes, rand: random.Random) -> bytes:
    """A safetensors file with one edit in its JSON header (dtype, shape, offsets,
    metadata), the rest of the file as it was."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(edit_value(json.loads(data[8 : 8 + n]), rand)).encode()
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def damages(name: str):
    kinds = [truncate, flip]
    kinds.append(edit_json if name.endswith(".json") else edit_header)
    return kinds


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def fuzz(target, files: list[str], load, named_by: str, seed: int) -> int:
    """Damage each of ``files`` of ``target`` (a directory, or a file when ``files`` is
    [""]) ``TRIALS`` times per kind; return how many damaged copies were refused."""
    rand = random.Random(seed)
    original = load(target)
    refused = 0
    for name in files:
        path = target / name if name else target
        data = path.read_bytes()
        for damage in damages(path.name):
            for trial in range(TRIALS):
                damaged = damage(data, rand)
                path.write_bytes(damaged)
                try:
                    result = load(target)
                except CheckpointError as e:
                    assert named_by in str(e), f"{damage.__name__} of {path.name}: the message names no file: {e}"
                    refused += 1
                    continue
                finally:
                    path.write_bytes(data)
                assert equal(result, original), f"{damage.__name__} #{trial} of {path.name} loaded a different result"
    return refused


def adapter_model(sparsity=0.5, block=(16, 8)):
    """A tiny Llama's LoRI-S adapter (LoRI-D with ``sparsity`` None) and its masks."""
    model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=block, seed=3))
    randomize_b(model)
    if sparsity is None:
        return model, None
    masks = lori.extract_masks(model, sparsity)
    model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=block, seed=3), masks=masks)
    randomize_b(model, seed=2)
    return model, masks


def imported_original_adapter(tmp_path):
    """The original LoRI code's adapter (resized vocabulary, lora_B.mask) imported: element
    masks and the embeddings as stored weights."""
    from test_peft_interop import original_lori_adapter

    original_lori_adapter(tmp_path / "original", "resized vocabulary")
    return lori.import_peft(tiny_model(), tmp_path / "original")


ADAPTERS = {
    "blocks": lambda tmp_path: adapter_model()[0],
    "element masks as gaps": lambda tmp_path: adapter_model(0.9, (1, 1))[0],
    "element masks as bitmaps": lambda tmp_path: adapter_model(None, (1, 1))[0],
    "stored weights": imported_original_adapter,
}


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_fuzzed_lori_adapters(tmp_path, kind):
    path = lori.save_lori(ADAPTERS[kind](tmp_path), tmp_path / "adapter")
    encodings = {info["b_blocks"] for info in json.loads((path / "lori_config.json").read_text())["layers"].values()}
    assert kind != "element masks as gaps" or encodings == {"deltas"}
    assert kind != "element masks as bitmaps" or encodings == {"bitmap"}
    refused = fuzz(path, ["lori_config.json", "adapter.safetensors"], read_lori, str(path), seed=0)
    assert refused > TRIALS  # most damage is seen (an edit to JSON whitespace is not)


def test_fuzzed_masks(tmp_path):
    path = tmp_path / "masks.safetensors"
    lori.save_masks(adapter_model()[1], path)
    assert fuzz(path, [""], load_masks, str(path), seed=1) > TRIALS


def test_fuzzed_peft_exports(tmp_path):
    path = lori.export_peft(adapter_model()[0], tmp_path / "peft")

    def load(p):
        config, updates = read_peft(p)
        return config.to_dict(), {n: (u.b, u.a, u.mask, u.scaling) for n, u in updates.items()}

    assert fuzz(path, ["adapter_config.json", "adapter_model.safetensors"], load, str(path), seed=2) > TRIALS


@pytest.mark.slow
def test_fuzzed_training_checkpoints(tmp_path):
    tokenizer = toy.build_tokenizer(tmp_path / "tokenizer")
    toy.build_base_model(tmp_path / "base", tokenizer, steps=2, progress=False)
    toy.write_jsonl(toy.caesar_examples(32, 1, 10), tmp_path / "train.jsonl")
    cfg = TrainConfig(
        model=str(tmp_path / "base"), data=str(tmp_path / "train.jsonl"), output=str(tmp_path / "run"),
        adapter=LoRIConfig(r=8, block=(16, 8)), batch_size=8, max_steps=2, save_every=1, progress=False,
    )  # fmt: skip
    train(cfg)
    path = tmp_path / "run" / "checkpoints" / "step-0000001"
    shutil.copytree(path, tmp_path / "pristine")

    def load(p):
        return read_checkpoint(p), read_lori(p)

    files = ["trainer_state.json", "optimizer.safetensors", "lori_config.json", "adapter.safetensors"]
    assert fuzz(path, files, load, str(path), seed=3) > 2 * TRIALS
