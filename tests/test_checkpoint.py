"""Compact checkpoints: round trips, size, the stored forms of the kept blocks (format 2)
and format 1 files, and a loader that refuses bad files cleanly."""

import hashlib
import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model import TINY, randomize_b, tiny_model

import lori
from lori import LoRIConfig
from lori.checkpoint import (
    BINDING_KEY,
    CONFIG_FILE,
    INDEX_ENCODINGS,
    TENSORS_FILE,
    CheckpointError,
    decode_b_blocks,
    encode_b_blocks,
    load_lori,
    read_lori,
    save_lori,
)
from lori.digests import json_digest
from lori.masks import extract_masks


def saved(tmp_path, sparsity=None, seed=3, block=(16, 8)):
    """A tiny Llama's adapter (random B; LoRI-S under extracted masks with ``sparsity``)
    and the directory it was saved to."""
    model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=block, seed=seed))
    randomize_b(model)
    if sparsity is not None:
        masks = extract_masks(model, sparsity)
        model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=block, seed=seed), masks=masks)
        randomize_b(model, seed=2)
    return model, save_lori(model, tmp_path / "adapter")


def rewrite(path, mutate, *, bind=True):
    """Edit a checkpoint's tensors and manifest in place (``mutate(tensors, manifest)``) and
    save both with matching checksums: bound to each other (``bind``), or as written before
    config checksums existed."""
    tensors = load_file(path / TENSORS_FILE)
    manifest = json.loads((path / CONFIG_FILE).read_text())
    manifest.pop("adapter_sha256")
    mutate(tensors, manifest)
    save_file(tensors, path / TENSORS_FILE, metadata={BINDING_KEY: json_digest(manifest)} if bind else None)
    manifest["adapter_sha256"] = hashlib.sha256((path / TENSORS_FILE).read_bytes()).hexdigest()
    (path / CONFIG_FILE).write_text(json.dumps(manifest))


def to_format_1(tensors, manifest):
    """A format-2 checkpoint as format 1 wrote it: every layer's blocks as int32 pairs."""
    config = LoRIConfig.from_dict(manifest["config"])
    manifest["format_version"] = 1
    assert not manifest.pop("stored")
    for name, info in manifest["layers"].items():
        encoding = info.pop("b_blocks")
        data = tensors.pop(f"{name}.{INDEX_ENCODINGS[encoding]}")
        out = info["shape"][0]
        tensors[f"{name}.b_blocks"] = decode_b_blocks(encoding, data, info["nnz"], out, config.r, config.block)


def recode(name, encoding, damage=None):
    """A ``rewrite`` mutation storing layer ``name``'s blocks as ``encoding``, its bytes
    then changed by ``damage``."""

    def mutate(tensors, manifest):
        info = manifest["layers"][name]
        config = LoRIConfig.from_dict(manifest["config"])
        old = info["b_blocks"]
        out, data = info["shape"][0], tensors.pop(f"{name}.{INDEX_ENCODINGS[old]}")
        b_blocks = decode_b_blocks(old, data, info["nnz"], out, config.r, config.block)
        info["b_blocks"], data = encode_b_blocks(b_blocks, out, config.r, config.block, encoding)
        tensors[f"{name}.{INDEX_ENCODINGS[encoding]}"] = damage(data) if damage else data

    return mutate


def logits(model):
    with torch.no_grad():
        return model(torch.arange(10).reshape(1, 10)).logits


@pytest.mark.parametrize("sparsity", [None, 0.9])
def test_round_trip_into_a_fresh_base_model(tmp_path, sparsity):
    model, path = saved(tmp_path, sparsity)
    assert sorted(p.name for p in path.iterdir()) == [TENSORS_FILE, CONFIG_FILE]
    loaded = load_lori(tiny_model(), path)
    torch.testing.assert_close(logits(loaded), logits(model))
    for name, layer in lori.lori_layers(loaded).items():
        other = lori.lori_layers(model)[name]
        assert layer.layer_seed == other.layer_seed and torch.equal(layer.b_blocks, other.b_blocks)


def test_load_into_a_model_with_the_same_adapter_and_seed_follows_the_file(tmp_path):
    model, path = saved(tmp_path, 0.9, seed=7)
    target = lori.get_lori_model(
        tiny_model(),
        LoRIConfig(r=8, block=(16, 8), seed=99),
        masks={n: layer.mask() for n, layer in lori.lori_layers(model).items()},
    )
    load_lori(target, path)
    torch.testing.assert_close(logits(target), logits(model))


def test_tensor_file_holds_only_seeds_and_blocks(tmp_path):
    model, path = saved(tmp_path, 0.9)
    per_layer = read_lori(path).layers
    assert set(per_layer) == set(lori.lori_layers(model))
    manifest = json.loads((path / CONFIG_FILE).read_text())
    assert manifest["rng"] == "lori-rng-v1" and manifest["format_version"] == 2
    assert manifest["config"]["r"] == 8 and manifest["base_model"]["fingerprint"] and manifest["stored"] == {}
    kinds = {name.rsplit(".", 1)[1] for name in load_file(path / TENSORS_FILE)}
    assert kinds <= {"seed", "b_values", *INDEX_ENCODINGS.values()}


@pytest.mark.parametrize("block, target", [((32, 32), 0.055), ((1, 1), 0.085)])
def test_size_against_peft_lora_at_llama_proportions(tmp_path, block, target):
    """r 32, 90% sparsity, a model with Llama-3-8B's proportions (hidden : intermediate :
    kv = 4096 : 14336 : 1024) scaled down 4x: the checkpoint is at most 5.5% of PEFT LoRA's
    adapter (A and B dense; fp32 both) with blocks, 8.5% with element masks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = lori.get_lori_model(LlamaForCausalLM(config), LoRIConfig(r=32, block=block))
    randomize_b(model)
    masks = extract_masks(model, 0.9)
    lori_s = lori.get_lori_model(LlamaForCausalLM(config), LoRIConfig(r=32, block=block), masks=masks)
    path = save_lori(lori_s, tmp_path / "adapter")
    ours = sum(f.stat().st_size for f in path.iterdir())
    peft_bytes = 4 * sum(32 * (layer.in_features + layer.out_features) for layer in lori.lori_layers(lori_s).values())
    assert ours <= target * peft_bytes, f"{ours} bytes = {ours / peft_bytes:.2%} of PEFT's {peft_bytes}"


@pytest.mark.parametrize(
    "sparsity, encodings",
    [(None, {"bitmap"}), (0.5, {"bitmap"}), (0.9, {"deltas"}), (0.995, {"deltas", "pairs"})],
)
def test_element_masks_are_stored_compactly_and_round_trip(tmp_path, sparsity, encodings):
    """Block (1, 1), the original LoRI's element masks: each layer's kept elements are
    stored as a bitmap or as gaps, whichever is smaller (pairs when only a few are kept),
    and decode to exactly the model's ``b_blocks``."""
    model, path = saved(tmp_path, sparsity, block=(1, 1))
    manifest = json.loads((path / CONFIG_FILE).read_text())
    assert {info["b_blocks"] for info in manifest["layers"].values()} <= encodings
    tensors = load_file(path / TENSORS_FILE)
    kept = sum(info["nnz"] for info in manifest["layers"].values())
    index_bytes = sum(t.nbytes for name, t in tensors.items() if name.endswith(("b_bitmap", "b_deltas", "b_blocks")))
    assert index_bytes <= 8 * kept
    if sparsity == 0.9:
        assert index_bytes < 1.01 * kept  # one byte per kept value, hardly any escapes
    loaded = load_lori(tiny_model(), path)
    for name, layer in lori.lori_layers(loaded).items():
        assert torch.equal(layer.b_blocks, lori.lori_layers(model)[name].b_blocks)
        assert torch.equal(layer.b_values, lori.lori_layers(model)[name].b_values)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def keys_cases():
    """(grid size, kept keys): empty, full, ends, gaps around the escape (255), long runs
    of escapes, grids that are not a multiple of 8."""
    g = torch.Generator().manual_seed(0)
    cases = [(13, []), (13, list(range(13))), (1, [0]), (9, [8]), (600, [0, 599]), (600, [599])]
    cases += [(2000, [254, 254 + 256, 254 + 512, 254 + 768]), (2000, [255, 511, 767]), (2000, [256, 1999])]
    cases += [(100_003, sorted(torch.randperm(100_003, generator=g)[:n].tolist())) for n in (1, 40, 10_000, 60_000)]
    return cases


@pytest.mark.parametrize("encoding", list(INDEX_ENCODINGS))
def test_every_stored_form_of_the_kept_blocks_decodes_exactly(encoding):
    for n, keys in keys_cases():
        for out, r, block in ((n, 1, (1, 1)), (n * 4, 8, (4, 8)), (n * 2 - 1, 4, (2, 2))):
            n_cols = r // block[1]
            if n % n_cols:
                continue
            keys_t = torch.tensor(keys, dtype=torch.int64)
            b_blocks = torch.stack([keys_t // n_cols, keys_t % n_cols], dim=1).to(torch.int32).reshape(-1, 2)
            chosen, data = encode_b_blocks(b_blocks, out, r, block, encoding)
            assert chosen == encoding
            back = decode_b_blocks(encoding, data, len(keys), out, r, block)
            assert back.dtype == torch.int32 and torch.equal(back, b_blocks), (n, keys[:5], block)
            _, best = encode_b_blocks(b_blocks, out, r, block)
            assert best.nbytes <= data.nbytes


def test_checkpoints_of_format_1_still_load(tmp_path, caplog):
    """Format 1 (every layer's blocks as int32 pairs, no stored weights) loads as it did,
    bound or from before config checksums; saving again writes format 2."""
    model, path = saved(tmp_path, 0.9, block=(1, 1))
    rewrite(path, to_format_1)
    manifest = json.loads((path / CONFIG_FILE).read_text())
    assert manifest["format_version"] == 1 and "stored" not in manifest
    assert all(name.endswith(("seed", "b_values", "b_blocks")) for name in load_file(path / TENSORS_FILE))
    loaded = load_lori(tiny_model(), path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    rewrite(path, lambda t, m: None, bind=False)
    torch.testing.assert_close(logits(load_lori(tiny_model(), path)), logits(model), rtol=0, atol=0)
    assert "predates config checksums" in caplog.text
    save_lori(loaded, path)
    assert json.loads((path / CONFIG_FILE).read_text())["format_version"] == 2


def test_wrong_base_model_and_mismatched_adapters(tmp_path):
    _, path = saved(tmp_path, 0.9)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(**{**TINY, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match="trained on another base model"):
        load_lori(other, path)
    with pytest.raises(CheckpointError, match="is \\[128, 64\\] in the model but \\[96, 64\\]"):
        load_lori(other, path, check_base=False)
    dense = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 8)))
    with pytest.raises(CheckpointError, match="differs from"):
        load_lori(dense, path)
    assert not lori.lori_layers(other)  # untouched


def corrupt_cases(path):
    """(description, function that damages the checkpoint at path, expected message). The
    first layer of a dense adapter with block (16, 8) has 4 blocks, stored as a bitmap."""
    tensors = path / TENSORS_FILE
    config = path / CONFIG_FILE
    manifest = json.loads(config.read_text())

    def edit(**changes):
        return lambda: config.write_text(json.dumps({**manifest, **changes}))

    def truncate():
        tensors.write_bytes(tensors.read_bytes()[: len(tensors.read_bytes()) // 2])

    def flip():
        data = bytearray(tensors.read_bytes())
        data[len(data) - 5] ^= 0x10
        tensors.write_bytes(bytes(data))

    def pickle_instead():
        torch.save({"x": torch.ones(2)}, tensors)

    def resave(*mutations):
        def run():
            for mutate in mutations:
                rewrite(path, mutate)

        return run

    def tensor(name, change):
        return lambda t, m: change(t, t[name])

    first = next(iter(manifest["layers"]))
    index, values, layer = f"{first}.b_blocks", f"{first}.b_values", manifest["layers"][first]
    assert (layer["b_blocks"], layer["nnz"]) == ("bitmap", 4)

    def stored_as(encoding, damage):
        return resave(recode(first, encoding, damage))

    def grow(data, *values):
        return torch.cat([data, data.new_tensor(values)])

    common = [
        ("missing tensors", lambda: tensors.unlink(), "adapter.safetensors is missing"),
        ("garbage json", lambda: config.write_text("{not json"), "is not valid JSON"),
        ("foreign json", lambda: config.write_text(json.dumps({"peft_type": "LORA"})), "is not a LoRI adapter config"),
        ("future version", edit(format_version=3), "format version 3"),
        ("other rng", edit(rng="lori-rng-v2"), "needs the generator 'lori-rng-v2'"),
        ("bad config", edit(config={**manifest["config"], "r": 0}), "bad LoRI config"),
        ("truncated", truncate, "truncated or corrupted"),
        ("bit flip", flip, "truncated or corrupted"),
        ("pickle", pickle_instead, "truncated or corrupted"),
        ("nan", resave(tensor(values, lambda t, v: v.view(-1).__setitem__(0, float("nan")))), "NaN or Inf"),
        ("seed dtype", resave(lambda t, m: t.update({f"{first}.seed": t[f"{first}.seed"].int()})), "must be one int64"),
        ("extra tensor", resave(lambda t, m: t.update({"lm_head.weight": torch.zeros(2)})), "unexpected \\['lm_head"),
        ("missing tensor", resave(lambda t, m: t.pop(values)), "missing"),
        ("wrong block shape", resave(lambda t, m: t.update({values: t[values][:, :8].clone()})), "must have shape"),
        ("kept count", resave(lambda t, m: m["layers"][first].update(nnz=3)), "config says 3"),
        ("unknown encoding", resave(lambda t, m: m["layers"][first].update(b_blocks="rle")), "blocks as 'rle'"),
        # The bitmap of 4 blocks: one byte, bits 0-3 used.
        ("bitmap past the grid", stored_as("bitmap", lambda d: d | 0x80), "sets bits past the grid"),
        ("bitmap length", stored_as("bitmap", lambda d: grow(d, 0)), "must have 1 bytes"),
        ("bitmap dtype", stored_as("bitmap", lambda d: d.to(torch.int8)), "must be a 1-D uint8 tensor"),
        ("bitmap count", stored_as("bitmap", lambda d: d & 0x7), "holds 3 kept blocks"),
        # Gaps 0, 0, 0, 0: one byte each.
        ("deltas escape", stored_as("deltas", lambda d: grow(d, 255)), "ends inside a gap"),
        ("deltas past the grid", stored_as("deltas", lambda d: grow(d[:3], 1)), "past the grid"),
        ("deltas count", stored_as("deltas", lambda d: d[:3]), "holds 3 kept blocks"),
        ("deltas shape", stored_as("deltas", lambda d: d.reshape(2, 2)), "must be a 1-D uint8 tensor"),
    ]  # fmt: skip
    pairs = [  # damage to b_blocks, stored as int32 pairs: in format 1, or by choice in format 2
        ("block out of range", tensor(index, lambda t, v: v.__setitem__((0, 0), 99)), "out of range"),
        ("duplicate block", tensor(index, lambda t, v: v.__setitem__(1, v[0].clone())), "duplicated"),
        ("unsorted blocks", tensor(index, lambda t, v: v.copy_(v.flip(0))), "not sorted"),
        ("b_blocks dtype", lambda t, m: t.update({index: t[index].long()}), "int32"),
    ]
    return common + [
        (f"{name}, format {version}", resave(*before, damage), message)
        for version, before in ((1, [to_format_1]), (2, [recode(first, "pairs")]))
        for name, damage, message in pairs
    ]


def test_corrupted_checkpoints_are_refused_and_the_model_is_untouched(tmp_path):
    """(A dense adapter: every layer has several blocks to damage.)"""
    model, path = saved(tmp_path)
    names = [c[0] for c in corrupt_cases(path)]
    for i, name in enumerate(names):
        _, fresh = saved(tmp_path / f"case{i}")
        damage, message = next((c[1], c[2]) for c in corrupt_cases(fresh) if c[0] == name)
        damage()
        target = tiny_model()
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises((CheckpointError, FileNotFoundError), match=message):
            load_lori(target, fresh)
        assert not lori.lori_layers(target), name
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), name


def test_fuzzed_bytes_never_load_silently(tmp_path):
    """Random byte damage anywhere in either file: a clean CheckpointError every time."""
    rand = random.Random(0)
    _, path = saved(tmp_path, 0.9)
    originals = {f: (path / f).read_bytes() for f in (CONFIG_FILE, TENSORS_FILE)}
    for trial in range(40):
        f = rand.choice(list(originals))
        data = bytearray(originals[f])
        for _ in range(rand.randint(1, 4)):
            data[rand.randrange(len(data))] = rand.randrange(256)
        for g, original in originals.items():
            (path / g).write_bytes(bytes(data) if g == f else original)
        if bytes(data) == originals[f]:
            continue
        try:
            load_lori(tiny_model(), path)
        except CheckpointError:
            continue
        # A change that still loads must be one the checksum cannot see: JSON whitespace
        # or an equivalent value in the config file.
        assert f == CONFIG_FILE, f"trial {trial}: damaged {f} loaded"


def test_save_replaces_atomically(tmp_path):
    model, path = saved(tmp_path, 0.9)
    randomize_b(model, seed=5)
    save_lori(model, path)
    torch.testing.assert_close(logits(load_lori(tiny_model(), path)), logits(model))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary leftovers


def test_atomic_writes_get_the_usual_modes(tmp_path):
    """mkdtemp and mkstemp make private paths; a saved adapter or masks file is as readable as
    any new directory or file."""
    import os

    mask = os.umask(0o022)
    try:
        model, path = saved(tmp_path)
        lori.save_masks(extract_masks(model, 0.5), tmp_path / "masks.safetensors")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "masks.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_non_finite_or_unloadable_save_is_refused_and_keeps_the_good_adapter(tmp_path):
    """A diverged model saved over a good adapter used to replace it; float16 with B = 1e5
    and int8 were written though the loader refuses them."""
    model, path = saved(tmp_path, 0.9)
    good = read_lori(path)[1]
    layer = next(iter(lori.lori_layers(model).values()))
    with torch.no_grad():
        layer.b_values.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="b_values: it holds NaN or Inf in torch.float32"):
        save_lori(model, path)
    with torch.no_grad():
        layer.b_values.view(-1)[0] = 1e5
    with pytest.raises(ValueError, match="NaN or Inf in torch.float16"):
        save_lori(model, path, dtype=torch.float16)
    for dtype in (torch.int8, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match=f"cannot store b_values as {dtype}"):
            save_lori(model, path, dtype=dtype)
    after = read_lori(path)[1]
    assert all(torch.equal(after[n][k], good[n][k]) for n in good for k in good[n])


def test_an_edited_config_is_refused(tmp_path):
    """r 8 -> 16 in lori_config.json used to load silently with half the scaling."""
    _, path = saved(tmp_path)
    manifest = json.loads((path / CONFIG_FILE).read_text())
    manifest["config"]["r"], manifest["config"]["block"] = 16, [16, 16]
    (path / CONFIG_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="lori_config.json was changed after it was saved"):
        load_lori(tiny_model(), path)


def test_an_adapter_saved_before_config_checksums_still_loads(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    model, path = saved(tmp_path)
    save_file(load_file(path / TENSORS_FILE), path / TENSORS_FILE)  # no metadata: as written before
    manifest = json.loads((path / CONFIG_FILE).read_text())
    import hashlib

    manifest["adapter_sha256"] = hashlib.sha256((path / TENSORS_FILE).read_bytes()).hexdigest()
    (path / CONFIG_FILE).write_text(json.dumps(manifest))
    torch.testing.assert_close(logits(load_lori(tiny_model(), path)), logits(model))
    assert "predates config checksums" in caplog.text


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(base_model="meta-llama/Llama-3-8B"), "has a str as its 'base_model' entry"),
        (lambda m: m.update(layers=[]), "has a list as its 'layers' entry"),
        (lambda m: m["base_model"].update(fingerprint=3), "'base_model' must hold the strings"),
        (lambda m: m.pop("adapter_sha256"), "has no 'adapter_sha256' entry"),
    ],
)
def test_manifest_entries_of_the_wrong_kind_are_named(tmp_path, edit, message):
    _, path = saved(tmp_path)
    manifest = json.loads((path / CONFIG_FILE).read_text())
    edit(manifest)
    (path / CONFIG_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message):
        read_lori(path)


def test_deeply_nested_json_and_fp8_values_are_named(tmp_path):
    _, path = saved(tmp_path)
    original = (path / CONFIG_FILE).read_text()
    (path / CONFIG_FILE).write_text("[" * 100_000)
    with pytest.raises(CheckpointError, match="lori_config.json is not a LoRI adapter's JSON: it is nested too deeply"):
        read_lori(path)
    (path / CONFIG_FILE).write_text(original)
    import hashlib

    from safetensors.torch import load_file, save_file

    tensors = load_file(path / TENSORS_FILE)
    first = next(k for k in tensors if k.endswith("b_values"))
    tensors[first] = tensors[first].to(torch.float8_e4m3fn)
    save_file(tensors, path / TENSORS_FILE)
    manifest = json.loads(original)
    manifest["adapter_sha256"] = hashlib.sha256((path / TENSORS_FILE).read_bytes()).hexdigest()
    (path / CONFIG_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="must be float32, bfloat16, float16 or float64, got torch.float8"):
        read_lori(path)
