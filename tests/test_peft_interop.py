"""PEFT LoRA adapters in and out: export loads in PEFT with the same outputs, import keeps
PEFT's (and the original LoRI code's) adapters working, round trips both ways."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model import randomize_b, tiny_model

import lori
from lori import LoRIConfig
from lori.peft_interop import PEFT_CONFIG_FILE, PEFT_TENSORS_FILE

IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


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


def test_bad_peft_adapters_are_refused_and_the_model_is_untouched(tmp_path):
    theirs = peft_model()
    theirs.save_pretrained(tmp_path / "good")
    config = json.loads((tmp_path / "good" / PEFT_CONFIG_FILE).read_text())
    tensors = load_file(tmp_path / "good" / PEFT_TENSORS_FILE)
    key_b = next(k for k in tensors if "lora_B" in k)

    def variant(name, config_changes=None, tensor_changes=None, drop=()):
        d = tmp_path / name
        d.mkdir()
        (d / PEFT_CONFIG_FILE).write_text(json.dumps({**config, **(config_changes or {})}))
        t = {k: v for k, v in {**tensors, **(tensor_changes or {})}.items() if k not in drop}
        save_file(t, d / PEFT_TENSORS_FILE)
        return d

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
        (variant("foreign", tensor_changes={"base_model.model.lm_head.weight": torch.ones(2)}), "not a LoRA A or B"),
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
