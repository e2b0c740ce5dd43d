"""LoRI on the common Hugging Face architectures (tiny random configs built here, nothing
downloaded): the default targets are PEFT's ``all-linear``, one training step trains only
the B values, logits equal PEFT LoRA's with the same A and B, the adapter saves and loads,
and merging keeps the logits."""

import copy
import json

import pytest
import torch
import transformers

import lori
from lori import LoRIConfig
from lori.checkpoint import CONFIG_FILE

peft = pytest.importorskip("peft")
# PEFT's own conversion of Mixtral's targets warns about a fused pattern it then does not use.
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")

VOCAB = 128
# One small shape for every family: 2 layers, hidden 64, 4 heads of 16 (2 for keys and values).
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)
ARCHITECTURES = {
    "llama": ("LlamaConfig", COMMON),
    "mistral": ("MistralConfig", COMMON),
    "qwen2": ("Qwen2Config", COMMON),
    "qwen3": ("Qwen3Config", {**COMMON, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {**COMMON, "head_dim": 16}),
    "gemma3_text": ("Gemma3TextConfig", {**COMMON, "head_dim": 16}),
    "phi3": ("Phi3Config", COMMON),
    "gpt_neox": ("GPTNeoXConfig", {**COMMON, "num_key_value_heads": 4}),
    "opt": (
        "OPTConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=96,
            word_embed_proj_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
    ),
    "mixtral": ("MixtralConfig", {**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)),
}
# The linear layers (last name components) "all-linear" adapts in each family.
ADAPTED = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"], set(lori.DEFAULT_TARGET_MODULES)),
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
    "mixtral": {"q_proj", "k_proj", "v_proj", "o_proj"},  # its experts are 3-D parameters
    "gpt2": {"c_attn", "c_proj", "c_fc"},  # Conv1D layers (weights stored [in, out])
}
CONFIG = dict(r=8, block=(16, 8))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(kind: str) -> torch.nn.Module:
    name, fields = ARCHITECTURES[kind]
    config = getattr(transformers, name)(**fields)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def randomize_b(model) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lori.lori_layers(model).values():
            layer.b_values.copy_(torch.randn(layer.b_values.shape, generator=g) * 0.1)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()).logits


@pytest.fixture(params=list(ARCHITECTURES))
def case(request):
    """(kind, a pristine base, the same base with B-randomized LoRI adapters)."""
    base = tiny_model(request.param)
    model = lori.get_lori_model(copy.deepcopy(base), LoRIConfig(**CONFIG))
    randomize_b(model)
    return request.param, base, model


def test_default_targets_are_peft_all_linear(case):
    """The same linear layers as PEFT's "all-linear"; on Mixtral PEFT also adapts the
    router and the experts' 3-D parameters (``target_parameters``), which LoRI leaves frozen.
    PEFT's per-model-type defaults (q_proj and v_proj on most, none for Phi-3) are a subset."""
    kind, base, model = case
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules="all-linear"))
    adapted = {n: m for n, m in theirs.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    linear = {n for n, m in adapted.items() if isinstance(m, peft.tuners.lora.Linear)}
    assert set(lori.lori_layers(model)) == linear
    assert {n.rsplit(".", 1)[-1] for n in linear} == ADAPTED[kind]
    others = {n.split(".mlp.")[-1] for n in set(adapted) - linear}
    assert others == ({"gate", "experts", "experts.base_layer"} if kind == "mixtral" else set())
    # PEFT's per-model-type defaults (target_modules=None), where it has them, are among ours.
    table = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    assert set(table.get(base.config.model_type, ())) <= ADAPTED[kind]


def test_logits_equal_peft_lora_with_the_same_a_and_b(case):
    _, base, model = case
    adapted = sorted(lori.lori_layers(model))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=adapted))
    with torch.no_grad():
        for name, layer in lori.lori_layers(model).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.a())
            peft_layer.lora_B["default"].weight.copy_(layer.b_dense())
    torch.testing.assert_close(logits(model), logits(theirs.eval()))
    assert not torch.allclose(logits(model), logits(base))  # the adapters do change the logits


def test_one_training_step_trains_only_b(case):
    _, _, model = case
    model.train()
    tokens = ids()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"{n}.b_values" for n in lori.lori_layers(model)}
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    assert model(tokens, labels=tokens).loss < loss


def test_save_load_round_trip(case, tmp_path):
    _, base, model = case
    lori.save_lori(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())["config"]["target_modules"] == "all-linear"
    loaded = lori.load_lori(copy.deepcopy(base), tmp_path / "adapter")
    assert set(lori.lori_layers(loaded)) == set(lori.lori_layers(model))
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_merge_and_unload_keeps_the_logits(case):
    _, _, model = case
    before = logits(model)
    merged = lori.merge_and_unload(model)
    assert not lori.lori_layers(merged)
    torch.testing.assert_close(logits(merged), before, rtol=1e-5, atol=1e-5)


def test_regex_and_suffix_targets_select_as_peft():
    base = tiny_model("llama")
    cases = [
        r".*\.layers\.1\.self_attn\.(q|v)_proj",  # a regex matches whole names
        ["self_attn.o_proj", "down_proj"],  # a list matches name suffixes after a dot
    ]
    for targets in cases:
        ours = lori.get_lori_model(copy.deepcopy(base), LoRIConfig(**CONFIG, target_modules=targets))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules=targets))
        modules = theirs.base_model.model.named_modules()
        peft_names = {n for n, m in modules if isinstance(m, peft.tuners.lora.LoraLayer)}
        assert set(lori.lori_layers(ours)) == peft_names and peft_names


def test_older_configs_select_what_they_did(tmp_path):
    """A list of last name components (the only form before) adapts the same layers, and
    an adapter saved with one loads as before."""
    config = LoRIConfig(**CONFIG, target_modules=["q_proj", "v_proj"])
    assert LoRIConfig.from_dict(config.to_dict()) == config
    model = lori.get_lori_model(tiny_model("llama"), config)
    assert {n.rsplit(".", 1)[-1] for n in lori.lori_layers(model)} == {"q_proj", "v_proj"}
    assert len(lori.lori_layers(model)) == 4
    randomize_b(model)
    lori.save_lori(model, tmp_path / "adapter")
    loaded = lori.load_lori(tiny_model("llama"), tmp_path / "adapter")
    assert loaded.lori_config.target_modules == ("q_proj", "v_proj")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert LoRIConfig(target_modules=["ALL-LINEAR"]).target_modules == "all-linear"  # as the command line gives it


@pytest.mark.parametrize(
    "targets, error",
    [
        ("(", "not a regular expression"),
        (["nope"], r"select no nn.Linear"),
        (["mlp"], "a MixtralSparseMoeBlock, but LoRI adapts nn.Linear and Conv1D layers only"),
        (["experts"], "its MoE experts are 3-D parameters"),
        (["gate_up_proj"], "MoE experts stored as 3-D parameters"),
    ],
)
def test_unadaptable_targets_are_refused_by_name(targets, error):
    with pytest.raises(ValueError, match=error):
        lori.get_lori_model(tiny_model("mixtral"), LoRIConfig(**CONFIG, target_modules=targets))


def test_mixtral_experts_stay_frozen_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="lori.model"):
        model = lori.get_lori_model(tiny_model("mixtral"), LoRIConfig(**CONFIG))
    assert "MoE experts are 3-D parameters" in caplog.text
    assert not any(p.requires_grad for n, p in model.named_parameters() if "experts" in n)


def test_gpt2_conv1d_weights_reach_the_kernels_as_views_and_fold_back_exactly():
    """A Conv1D's weight [in, out] goes to the operator as its transposed view (no copy per
    call); folding adds ΔWᵀ into it and unfolding restores it bit for bit."""
    model = lori.get_lori_model(tiny_model("gpt2"), LoRIConfig(**CONFIG))
    randomize_b(model)
    layer = lori.lori_layers(model)["transformer.h.0.attn.c_attn"]
    assert layer.base_weight().data_ptr() == layer.base_layer.weight.data_ptr()
    assert (layer.out_features, layer.in_features) == (192, 64)
    before = {n: p.clone() for n, p in model.named_parameters() if "b_values" not in n}
    expected = logits(model)
    lori.merge_adapter(model)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    lori.unmerge_adapter(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "b_values" not in n)


def test_merging_adapters_names_what_their_targets_select(tmp_path):
    """``lori.merge`` of adapters with "all-linear" keeps it; with other targets besides, the
    merged config names the merged layers (names and a regex cannot be joined)."""
    for name, targets in (("a", "all-linear"), ("b", "all-linear"), ("c", r".*\.q_proj")):
        model = lori.get_lori_model(tiny_model("llama"), LoRIConfig(**CONFIG, target_modules=targets))
        randomize_b(model)
        lori.save_lori(model, tmp_path / name)
    merged = lori.merge(tiny_model("llama"), [tmp_path / "a", tmp_path / "b"])
    assert merged.lori_config.target_modules == "all-linear"
    merged = lori.merge(tiny_model("llama"), [tmp_path / "a", tmp_path / "c"])
    assert merged.lori_config.target_modules == tuple(sorted(lori.lori_layers(merged)))


def test_gpt2_adapters_export_to_peft_and_import_back(tmp_path):
    """PEFT keeps a Conv1D's A and B as a linear layer's (fan_in_fan_out only says how to
    fold): the exported adapter gives PEFT our logits, and imports back to them."""
    model = lori.get_lori_model(tiny_model("gpt2"), LoRIConfig(**CONFIG))
    randomize_b(model)
    lori.export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs), logits(model))
    torch.testing.assert_close(logits(lori.import_peft(tiny_model("gpt2"), tmp_path / "peft")), logits(model))
