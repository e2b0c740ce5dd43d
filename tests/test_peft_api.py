"""PEFT's PeftModel methods on a LoRI model: bound to every model with adapters, each the
library's function of the same job, gone again once the adapters are."""

import copy

import pytest
import torch
from test_model import randomize_b, tiny_model

import lori
from lori import LoRIConfig
from lori.checkpoint import ADAPTER_FILES
from lori.peft_api import PEFT_METHODS

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
CONFIG = LoRIConfig(r=8, block=(16, 4), seed=3)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def trained_model():
    model = lori.get_lori_model(tiny_model(), CONFIG)
    randomize_b(model)
    return model


def has_peft_methods(model):
    return all(getattr(model, name).__func__ is function for name, function in PEFT_METHODS.items())


def test_the_methods_are_peft_names():
    peft = pytest.importorskip("peft")
    for name in PEFT_METHODS:
        assert hasattr(peft.PeftModel, name) or hasattr(peft.LoraModel, name), name


def test_every_way_to_adapters_binds_the_methods_and_removing_them_unbinds(tmp_path):
    model = trained_model()
    assert has_peft_methods(model)
    assert has_peft_methods(copy.deepcopy(model))  # bound to the copy, not to the original
    assert copy.deepcopy(model).save_pretrained.__self__ is not model
    model.save_pretrained(tmp_path / "a")
    assert has_peft_methods(lori.load_lori(tiny_model(), tmp_path / "a"))
    assert has_peft_methods(lori.merge(tiny_model(), [tmp_path / "a"], weights=[1.0]))
    lori.export_peft(model, tmp_path / "peft")
    assert has_peft_methods(lori.import_peft(tiny_model(), tmp_path / "peft"))

    plain = model.unload()
    assert plain is model and not any(name in plain.__dict__ for name in PEFT_METHODS)
    assert type(plain).save_pretrained is plain.save_pretrained.__func__  # transformers' own again
    plain.save_pretrained(tmp_path / "whole")
    assert (tmp_path / "whole" / "model.safetensors").is_file()


def test_save_pretrained_writes_the_adapter_beside_other_files(tmp_path):
    model = trained_model()
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "tokenizer.json").write_text("{}")
    assert model.save_pretrained(tmp_path) == tmp_path
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint-3", "tokenizer.json", *ADAPTER_FILES}
    assert torch.equal(logits(lori.load_lori(tiny_model(), tmp_path)), logits(model))

    randomize_b(model, seed=9)  # a second save replaces the adapter, nothing else
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint-3", "tokenizer.json", *ADAPTER_FILES}
    for name, layer in lori.lori_layers(lori.load_lori(tiny_model(), tmp_path)).items():
        assert torch.equal(layer.b_values, lori.lori_layers(model)[name].b_values.to(torch.bfloat16).float())

    model.save_pretrained(tmp_path / "other", is_main_process=False)
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="no state_dict"):
        model.save_pretrained(tmp_path, state_dict=model.state_dict())


def test_methods_do_what_the_library_functions_do():
    model = trained_model()
    base = logits(tiny_model())
    adapted = logits(model)
    assert not torch.equal(adapted, base)

    assert model.print_trainable_parameters() == lori.print_trainable_parameters(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), adapted)

    weights = {n: p.clone() for n, p in model.named_parameters()}
    model.merge_adapter()
    twin = lori.merge_adapter(trained_model())
    assert all(torch.equal(p, dict(twin.named_parameters())[n]) for n, p in model.named_parameters())
    model.unmerge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())

    merged = model.merge_and_unload()
    assert lori.lori_layers(merged) == {} and getattr(merged, "lori_config", None) is None
    assert "save_pretrained" not in merged.__dict__
    twin = lori.merge_and_unload(trained_model())
    assert all(torch.equal(p, dict(twin.named_parameters())[n]) for n, p in merged.named_parameters())


def test_named_adapters_through_the_peft_methods(tmp_path):
    """load_adapter / set_adapter / delete_adapter as a PeftModel's (lori.adapters)."""
    model = trained_model()
    model.save_pretrained(tmp_path / "a")
    model.load_adapter(tmp_path / "a", adapter_name="again")
    assert lori.list_adapters(model) == ["default", "again"] and lori.active_adapter(model) == "default"
    model.set_adapter("again")
    assert lori.active_adapter(model) == "again"
    model.delete_adapter("again")
    assert lori.list_adapters(model) == ["default"]
    with pytest.raises(TypeError, match="takes no"):
        model.load_adapter(tmp_path / "a", adapter_name="x", is_trainable=True)
