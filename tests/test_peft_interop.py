"""PEFT LoRA adapters in and out: export loads in PEFT with the same outputs, import keeps
PEFT's (and the original LoRI code's, as it writes them) adapters working, round trips both
ways."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model import randomize_b, tiny_model

import lori
from lori import LoRIConfig
from lori.checkpoint import CONFIG_FILE, TENSORS_FILE, read_lori
from lori.cli import main
from lori.peft_interop import PEFT_CONFIG_FILE, PEFT_TENSORS_FILE

IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
PAD = 97  # the pad token the original LoRI code adds to a tokenizer without one
IDS_PAD = torch.cat([IDS, torch.full((2, 2), PAD)], dim=1)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def lori_s_model(sparsity=0.75, seed=3):
    """A tiny Llama with a trained-looking LoRI-S adapter (random B under random masks)."""
    model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 4), seed=seed))
    randomize_b(model, seed)
    masks = lori.extract_masks(model, sparsity)
    sparse = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 4), seed=seed), masks=masks)
    randomize_b(sparse, seed + 1)
    return sparse


def peft_model(seed=5, **config):
    """A tiny Llama with a PEFT LoRA adapter whose B is random (trained-looking)."""
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], **config)
    model = peft.get_peft_model(tiny_model(), lora).eval()
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_export_loads_in_peft_with_the_same_outputs(tmp_path):
    ours = lori_s_model()
    lori.export_peft(ours, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert config["target_modules"] == sorted(lori.DEFAULT_TARGET_MODULES)
    loaded = peft.PeftModel.from_pretrained(tiny_model(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded), logits(ours), rtol=1e-5, atol=1e-5)
    # The exported B is dense with zeros outside the kept blocks; A is the seeded A.
    tensors = load_file(tmp_path / "peft" / PEFT_TENSORS_FILE)
    name = "model.layers.1.mlp.up_proj"
    layer = lori.lori_layers(ours)[name]
    assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], layer.a())
    assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"] != 0, layer.b_dense() != 0)


def test_export_names_exactly_the_adapted_modules(tmp_path):
    model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, target_modules=["q_proj"]))
    randomize_b(model)
    lori.export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / PEFT_CONFIG_FILE).read_text())["target_modules"] == ["q_proj"]
    loaded = peft.PeftModel.from_pretrained(tiny_model(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_import_of_a_peft_adapter_gives_peft_outputs(tmp_path, rslora):
    theirs = peft_model(use_rslora=rslora)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lori.import_peft(tiny_model(), tmp_path / "peft")
    layers = lori.lori_layers(ours)
    assert len(layers) == 6 and all(layer.stored_a is not None for layer in layers.values())
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    # Round trip: our export of the import is the PEFT adapter we read.
    lori.export_peft(ours, tmp_path / "again")
    before, after = load_file(tmp_path / "peft" / PEFT_TENSORS_FILE), load_file(tmp_path / "again" / PEFT_TENSORS_FILE)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lori_to_peft_to_lori_round_trip_and_compact_save_of_stored_a(tmp_path):
    ours = lori_s_model()
    lori.export_peft(ours, tmp_path / "peft")
    back = lori.import_peft(tiny_model(), tmp_path / "peft", block=(16, 4))
    for name, layer in lori.lori_layers(back).items():
        assert torch.equal(layer.b_dense(), lori.lori_layers(ours)[name].b_dense())
    torch.testing.assert_close(logits(back), logits(ours), rtol=1e-6, atol=1e-6)
    # A stored-A adapter saves in our format (A beside the kept blocks) and loads back.
    lori.save_lori(back, tmp_path / "lori")
    again = lori.load_lori(tiny_model(), tmp_path / "lori")
    assert all(layer.stored_a is not None for layer in lori.lori_layers(again).values())
    torch.testing.assert_close(logits(again), logits(back), rtol=0, atol=0)


def test_original_lori_adapter_with_its_torch_saved_masks(tmp_path):
    """The original LoRI code: a PEFT adapter whose B is zero outside element masks saved
    with torch.save under PEFT's parameter names."""
    theirs = peft_model()
    g = torch.Generator().manual_seed(9)
    masks = {}
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            mask = torch.rand(p.shape, generator=g) < 0.1
            p.data.mul_(mask)
            masks[name] = mask.float()  # the original code keeps float masks
    torch.save(masks, tmp_path / "masks.pt")
    theirs.save_pretrained(tmp_path / "peft")
    ours = lori.import_peft(tiny_model(), tmp_path / "peft", masks=tmp_path / "masks.pt")
    layers = lori.lori_layers(ours)
    assert all(layer.block == (1, 1) for layer in layers.values())
    assert sum(layer.b_values.numel() for layer in layers.values()) == sum(int(m.sum()) for m in masks.values())
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    # Training touches only the masked elements.
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {f"{n}.b_values" for n in layers}


def write_variant(d, config, tensors, config_changes=None, tensor_changes=None, drop=()):
    """A PEFT adapter directory ``d``: ``config`` and ``tensors`` with the changes applied
    and the keys in ``drop`` left out."""
    d.mkdir()
    (d / PEFT_CONFIG_FILE).write_text(json.dumps({**config, **(config_changes or {})}))
    save_file({k: v for k, v in {**tensors, **(tensor_changes or {})}.items() if k not in drop}, d / PEFT_TENSORS_FILE)
    return d


def test_bad_peft_adapters_are_refused_and_the_model_is_untouched(tmp_path):
    theirs = peft_model()
    theirs.save_pretrained(tmp_path / "good")
    config = json.loads((tmp_path / "good" / PEFT_CONFIG_FILE).read_text())
    tensors = load_file(tmp_path / "good" / PEFT_TENSORS_FILE)
    key_b = next(k for k in tensors if "lora_B" in k)

    def variant(name, config_changes=None, tensor_changes=None, drop=()):
        return write_variant(tmp_path / name, config, tensors, config_changes, tensor_changes, drop)

    nan_b = tensors[key_b].clone()
    nan_b[0, 0] = float("nan")
    cases = [
        (variant("ia3", {"peft_type": "IA3"}), "not a PEFT LoRA adapter config"),
        (variant("dora", {"use_dora": True}), "DoRA"),
        (variant("bias", {"bias": "all"}), "trains biases"),
        (variant("pattern", {"rank_pattern": {"q_proj": 4}}), "per-layer ranks"),
        (variant("r", {"r": 4}), "do not fit r=4"),
        (variant("nan", tensor_changes={key_b: nan_b}), "NaN or Inf"),
        (variant("alone", drop=(key_b,)), "without its partner"),
        (variant("foreign", tensor_changes={f"{key_b[:-14]}.lora_C.weight": torch.ones(2)}), "not a LoRA A or B"),
        (
            variant("full", tensor_changes={"base_model.model.lm_head.weight": torch.ones(2)}),
            r"lm_head.weight is \[97, 64\] in the model but \[2\]",
        ),
    ]
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            lori.import_peft(model, path)
    with pytest.raises(ValueError, match="is missing"):
        lori.import_peft(model, tmp_path / "nowhere")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / PEFT_CONFIG_FILE).write_text(json.dumps(config))
    (tmp_path / "pickle" / "adapter_model.bin").write_bytes(b"\x80\x04not a weights-only file")
    with pytest.raises(ValueError, match="not a weights-only torch file"):
        lori.import_peft(model, tmp_path / "pickle")
    # Masks that do not belong to the adapter.
    names = [k.removeprefix("base_model.model.").removesuffix(".lora_B.weight") for k in tensors if "lora_B" in k]
    empty = {n: torch.zeros_like(tensors[f"base_model.model.{n}.lora_B.weight"], dtype=torch.bool) for n in names}
    with pytest.raises(ValueError, match="nonzero values outside its mask"):
        lori.import_peft(model, tmp_path / "good", masks=empty)
    with pytest.raises(ValueError, match="masks do not fit"):
        lori.import_peft(model, tmp_path / "good", masks=dict(list(empty.items())[:2]))
    # A model whose shapes differ from the adapter's.
    small = tiny_model()
    small.model.layers[1].self_attn.q_proj = torch.nn.Linear(64, 32, bias=False)
    with pytest.raises(ValueError, match=r"q_proj is \[32, 64\] in the model but \[64, 64\] in the adapter"):
        lori.import_peft(small, tmp_path / "good")
    assert not hasattr(model, "lori_config") and not lori.lori_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def resized_base(vocab=PAD + 1):
    """The tiny Llama as the original LoRI code prepares it: vocabulary grown by a pad token."""
    model = tiny_model()
    if vocab != PAD:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return model


ORIGINAL_VARIANTS = {
    # A current PEFT saves the resized embeddings beside the adapter (save_embedding_layers).
    "resized vocabulary": dict(save_embedding_layers=True),
    # PEFT 0.12 (the original's) leaves lora_B.mask out: the masks come from extract_mask.py's file.
    "PEFT 0.12, masks file": dict(save_embedding_layers=True, mask_keys=False),
    "modules_to_save": dict(modules_to_save=["embed_tokens", "lm_head"]),
    # LoRA on lm_head too: PEFT saves lm_head.base_layer.weight (and not the input embeddings:
    # with a resized vocabulary such a file lacks the pad token's embedding, and is refused).
    "lm_head adapted": dict(target_modules=[*lori.DEFAULT_TARGET_MODULES, "lm_head"], vocab=PAD),
}


def original_lori_adapter(path, variant, *, sparsity=0.9, seed=5, vocab=None):
    """A LoRI-S adapter as the original LoRI code writes it, built with peft: LoRA (r 8) on
    a tiny Llama whose vocabulary grew by a pad token, B zero outside element masks that
    its trainer registers as ``lora_B.mask`` parameters (float 0/1), saved with
    ``save_pretrained`` (or, ``mask_keys=False``, ``torch.save``d beside it as
    ``masks.pt``). Returns the PeftModel and its masks by module name."""
    options = dict(ORIGINAL_VARIANTS[variant])
    save_embedding_layers = options.pop("save_embedding_layers", "auto")
    mask_keys = options.pop("mask_keys", True)
    default_vocab = options.pop("vocab", PAD + 1)
    vocab = default_vocab if vocab is None else vocab
    options.setdefault("target_modules", list(lori.DEFAULT_TARGET_MODULES))
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, **options)
    model = peft.get_peft_model(resized_base(vocab), config).eval()
    g = torch.Generator().manual_seed(seed)
    masks, modules = {}, dict(model.named_modules())
    for name, p in model.named_parameters():
        if name.endswith("lora_B.default.weight"):
            mask = torch.rand(p.shape, generator=g) >= sparsity
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1 * mask)
            if mask_keys:
                modules[name.rsplit(".", 2)[0]].mask = torch.nn.Parameter(mask.float(), requires_grad=False)
            masks[name.removeprefix("base_model.model.").removesuffix(".lora_B.default.weight")] = mask
    if variant == "modules_to_save":  # trained copies of the embeddings
        for name, p in model.named_parameters():
            if "modules_to_save.default" in name:
                p.data.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.save_pretrained(path, save_embedding_layers=save_embedding_layers)
    if not mask_keys:
        torch.save({f"base_model.model.{n}.lora_B.default.weight": m for n, m in masks.items()}, path / "masks.pt")
    return model, masks


@pytest.mark.parametrize("variant", list(ORIGINAL_VARIANTS))
def test_original_lori_adapters_as_written_import_with_peft_outputs(tmp_path, variant):
    """The original code's files: full embeddings (resized vocabulary, modules_to_save, an
    adapted lm_head's base_layer) and lora_B.mask parameters. The import gives PeftModel's
    logits (pad token included), keeps the masks, saves and loads with the embeddings as
    stored weights in their dtype, and exports back to a PEFT adapter PEFT loads."""
    theirs, masks = original_lori_adapter(tmp_path / "peft", variant)
    vocab = theirs.get_input_embeddings().weight.shape[0]
    ids = IDS_PAD if vocab > PAD else IDS
    stored_names = ("lm_head.weight", "model.embed_tokens.weight") if vocab > PAD else ("lm_head.weight",)
    tensors = load_file(tmp_path / "peft" / PEFT_TENSORS_FILE)
    masks_file = tmp_path / "peft" / "masks.pt"
    assert any(k.endswith("lora_B.mask") for k in tensors) != masks_file.exists()
    reference = logits(peft.PeftModel.from_pretrained(resized_base(vocab), tmp_path / "peft").eval(), ids)
    torch.testing.assert_close(logits(theirs, ids), reference, rtol=0, atol=0)

    ours = lori.import_peft(tiny_model(), tmp_path / "peft", masks_file if masks_file.exists() else None)
    assert ours.lori_stored == stored_names
    assert ours.config.vocab_size == vocab and ours.lori_config.dropout == 0.0
    layers = lori.lori_layers(ours)
    assert set(layers) == set(masks) and all(layer.block == (1, 1) for layer in layers.values())
    assert all(torch.equal(layer.mask(), masks[name]) for name, layer in layers.items())
    torch.testing.assert_close(logits(ours, ids), reference, rtol=1e-5, atol=1e-5)

    lori.save_lori(ours, tmp_path / "lori")
    manifest = json.loads((tmp_path / "lori" / CONFIG_FILE).read_text())
    assert manifest["stored"] == {name: {"shape": [vocab, 64]} for name in stored_names}
    saved = load_file(tmp_path / "lori" / TENSORS_FILE)
    assert saved["lm_head.weight"].dtype == torch.float32
    assert torch.equal(saved["lm_head.weight"], tensors[next(k for k in tensors if "lm_head" in k and "lora" not in k)])
    again = lori.load_lori(tiny_model(), tmp_path / "lori")  # a base model of the original vocabulary
    torch.testing.assert_close(logits(again, ids), logits(ours, ids), rtol=0, atol=0)
    lori.save_lori(again, tmp_path / "again")
    twice = load_file(tmp_path / "again" / TENSORS_FILE)
    assert twice.keys() == saved.keys() and all(torch.equal(twice[k], saved[k]) for k in saved)

    lori.export_peft(again, tmp_path / "export")
    exported = peft.PeftModel.from_pretrained(resized_base(vocab), tmp_path / "export").eval()
    torch.testing.assert_close(logits(exported, ids), reference, rtol=1e-5, atol=1e-5)


def test_an_imported_adapter_trains_without_dropout_unless_asked(tmp_path, caplog):
    """The original code sets lora_dropout=0.05 but zeroes every dropout before training."""
    original_lori_adapter(tmp_path / "peft", "resized vocabulary")
    caplog.set_level("INFO")
    assert lori.import_peft(tiny_model(), tmp_path / "peft").lori_config.dropout == 0.0
    assert "trains with dropout 0 (its lora_dropout is 0.05)" in caplog.text
    assert lori.import_peft(tiny_model(), tmp_path / "peft", dropout=None).lori_config.dropout == 0.05
    assert lori.import_peft(tiny_model(), tmp_path / "peft", dropout=0.1).lori_config.dropout == 0.1
    tiny_model().save_pretrained(tmp_path / "base")
    for option, dropout in (([], 0.0), (["--dropout", "peft"], 0.05), (["--dropout", "0.2"], 0.2)):
        out = tmp_path / f"imported{len(option)}{dropout}"
        argv = ["import", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "peft"), *option]
        assert main([*argv, "--output", str(out)]) == 0
        assert read_lori(out).manifest["config"]["dropout"] == dropout


def test_original_adapters_that_cannot_be_imported_are_refused_by_name(tmp_path):
    """Each refusal names its cause; the model (its vocabulary too) is untouched."""
    original_lori_adapter(tmp_path / "good", "resized vocabulary")
    config = json.loads((tmp_path / "good" / PEFT_CONFIG_FILE).read_text())
    tensors = load_file(tmp_path / "good" / PEFT_TENSORS_FILE)
    mask_key = next(k for k in tensors if k.endswith("lora_B.mask"))

    def variant(name, config_changes=None, tensor_changes=None, drop=()):
        return write_variant(tmp_path / name, config, tensors, config_changes, tensor_changes, drop)

    peft.get_peft_model(
        resized_base(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"])
    ).save_pretrained(tmp_path / "embedding_lora")
    original_lori_adapter(tmp_path / "lm_head", "lm_head adapted", vocab=PAD + 1)
    cases = [
        (tmp_path / "embedding_lora", "LoRA on an embedding layer, which LoRI cannot hold"),
        (tmp_path / "lm_head", "does not store both the input and the output"),
        (variant("half", drop=("base_model.model.lm_head.weight",)), "does not store both the input and the output"),
        (variant("masks", drop=(mask_key,)), "has lora_B.mask for some layers only"),
        (variant("values", tensor_changes={mask_key: tensors[mask_key] * 2}), "values other than 0 and 1"),
        (variant("mts", {"modules_to_save": ["score"]}), "lists 'score' in modules_to_save but holds no weight"),
        (
            variant("unknown", tensor_changes={"base_model.model.model.norm2.weight": torch.ones(64)}),
            "holds the weight model.norm2.weight, which the model does not have",
        ),
        (
            variant("shape", tensor_changes={"base_model.model.model.norm.weight": torch.ones(65)}),
            r"model.norm.weight is \[64\] in the model but \[65\]",
        ),
    ]
    # Resized first, then refused by the adapter's layers: the resize is undone.
    narrow = tiny_model()
    narrow.model.layers[1].self_attn.q_proj = torch.nn.Linear(64, 32, bias=False)
    cases.append((tmp_path / "good", r"q_proj is \[32, 64\] in the model but \[64, 64\]", narrow))
    for path, message, *model in cases:
        model = model[0] if model else tiny_model()
        embeddings = model.get_input_embeddings().weight
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=message):
            lori.import_peft(model, path)
        assert model.get_input_embeddings().weight is embeddings and model.config.vocab_size == PAD
        assert model.get_output_embeddings().out_features == PAD and not hasattr(model, "lori_stored")
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Masks given beside the file's own must be the same.
    _, masks = original_lori_adapter(tmp_path / "other", "resized vocabulary", seed=6)
    with pytest.raises(ValueError, match="differ from .*'s own lora_B.mask"):
        lori.import_peft(tiny_model(), tmp_path / "good", masks=masks)


def test_layer_updates_alone_name_the_stored_weights_they_leave_out(tmp_path, caplog):
    """merge reads layer updates only (read_peft, read_lori_updates): a warning names the
    stored weights they do not carry; the *_adapter readers return them."""
    from lori.checkpoint import read_lori_adapter, read_lori_updates
    from lori.peft_interop import read_peft, read_peft_adapter

    original_lori_adapter(tmp_path / "peft", "resized vocabulary")
    names = ["lm_head.weight", "model.embed_tokens.weight"]
    updates = read_peft(tmp_path / "peft")[1]
    assert f"holds the full weights {names}" in caplog.text
    assert sorted(read_peft_adapter(tmp_path / "peft")[2]) == names
    lori.save_lori(lori.import_peft(tiny_model(), tmp_path / "peft"), tmp_path / "lori")
    caplog.clear()
    assert read_lori_updates(tmp_path / "lori")[1].keys() == updates.keys()
    assert f"stores the full weights {names}" in caplog.text
    _, _, stored = read_lori_adapter(tmp_path / "lori", base=tiny_model())  # the base before the resize
    assert sorted(stored) == names and stored["lm_head.weight"].shape == (PAD + 1, 64)


def test_continual_learning_carries_the_stored_weights(tmp_path):
    """stack_adapter on an adapter that stores full weights (an import with a resized
    vocabulary) installs them as load_lori does: the same model, logits and all."""
    from lori.continual import stack_adapter

    original_lori_adapter(tmp_path / "peft", "resized vocabulary")
    imported = lori.import_peft(tiny_model(), tmp_path / "peft")
    lori.save_lori(imported, tmp_path / "lori")
    model = tiny_model()
    stack_adapter(model, str(tmp_path / "lori"), None)
    assert model.lori_stored == imported.lori_stored == ("lm_head.weight", "model.embed_tokens.weight")
    ids = torch.randint(0, PAD, (2, 7))
    torch.testing.assert_close(logits(model.eval(), ids), logits(imported.eval(), ids), rtol=0, atol=0)
