"""Compact checkpoints: round trips, size, and a loader that refuses bad files cleanly."""

import json
import random

import pytest
import torch
from test_model import TINY, randomize_b, tiny_model

import lori
from lori import LoRIConfig
from lori.checkpoint import CONFIG_FILE, TENSORS_FILE, CheckpointError, load_lori, read_lori, save_lori
from lori.masks import extract_masks


def saved(tmp_path, sparsity=None, seed=3):
    model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 8), seed=seed))
    randomize_b(model)
    if sparsity is not None:
        masks = extract_masks(model, sparsity)
        model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 8), seed=seed), masks=masks)
        randomize_b(model, seed=2)
    return model, save_lori(model, tmp_path / "adapter")


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
    _, per_layer = read_lori(path)
    assert set(per_layer) == set(lori.lori_layers(model))
    manifest = json.loads((path / CONFIG_FILE).read_text())
    assert manifest["rng"] == "lori-rng-v1" and manifest["format_version"] == 1
    assert manifest["config"]["r"] == 8 and manifest["base_model"]["fingerprint"]


def test_size_against_peft_lora_at_llama_proportions(tmp_path):
    """r 32, 90% sparsity, a model with Llama-3-8B's proportions (hidden : intermediate :
    kv = 4096 : 14336 : 1024) scaled down 4x: the checkpoint is at most 5.5% of PEFT LoRA's
    adapter (A and B dense; fp32 both)."""
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
    model = lori.get_lori_model(LlamaForCausalLM(config), LoRIConfig(r=32))
    randomize_b(model)
    masks = extract_masks(model, 0.9)
    lori_s = lori.get_lori_model(LlamaForCausalLM(config), LoRIConfig(r=32), masks=masks)
    path = save_lori(lori_s, tmp_path / "adapter")
    ours = sum(f.stat().st_size for f in path.iterdir())
    peft_bytes = 4 * sum(32 * (layer.in_features + layer.out_features) for layer in lori.lori_layers(lori_s).values())
    assert ours <= 0.055 * peft_bytes, f"{ours} bytes = {ours / peft_bytes:.2%} of PEFT's {peft_bytes}"


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
    """(description, function that damages the checkpoint at path, expected message)."""
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

    def resave(mutate):
        def run():
            import hashlib

            from safetensors.torch import load_file, save_file

            t = load_file(tensors)
            mutate(t)
            save_file(t, tensors)
            config.write_text(
                json.dumps({**manifest, "adapter_sha256": hashlib.sha256(tensors.read_bytes()).hexdigest()})
            )

        return run

    first = next(iter(manifest["layers"]))
    return [
        ("missing tensors", lambda: tensors.unlink(), "adapter.safetensors is missing"),
        ("garbage json", lambda: config.write_text("{not json"), "is not valid JSON"),
        ("foreign json", lambda: config.write_text(json.dumps({"peft_type": "LORA"})), "is not a LoRI adapter config"),
        ("future version", edit(format_version=2), "format version 2"),
        ("other rng", edit(rng="lori-rng-v2"), "needs the generator 'lori-rng-v2'"),
        ("bad config", edit(config={**manifest["config"], "r": 0}), "bad LoRI config"),
        ("truncated", truncate, "truncated or corrupted"),
        ("bit flip", flip, "truncated or corrupted"),
        ("pickle", pickle_instead, "truncated or corrupted"),
        ("nan", resave(lambda t: t[f"{first}.b_values"].view(-1).__setitem__(0, float("nan"))), "NaN or Inf"),
        ("block out of range", resave(lambda t: t[f"{first}.b_blocks"].__setitem__((0, 0), 99)), "out of range"),
        (
            "duplicate block",
            resave(lambda t: t[f"{first}.b_blocks"].__setitem__(1, t[f"{first}.b_blocks"][0].clone())),
            "duplicated",
        ),
        ("seed dtype", resave(lambda t: t.update({f"{first}.seed": t[f"{first}.seed"].int()})), "must be one int64"),
        ("b_blocks dtype", resave(lambda t: t.update({f"{first}.b_blocks": t[f"{first}.b_blocks"].long()})), "int32"),
        (
            "extra tensor",
            resave(lambda t: t.update({"lm_head.weight": torch.zeros(2)})),
            "unexpected \\['lm_head.weight'\\]",
        ),
        ("missing tensor", resave(lambda t: t.pop(f"{first}.b_values")), "missing"),
        (
            "wrong block shape",
            resave(lambda t: t.update({f"{first}.b_values": t[f"{first}.b_values"][:, :8].contiguous()})),
            "b_values must have shape",
        ),
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
