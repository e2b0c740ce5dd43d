"""LoRI over a quantized frozen base (QLoRA-style), on the CPU: torchao's weight-only int8,
int4 and NF4 tensors and bitsandbytes' NF4 and LLM.int8 layers (``lori.quantize_base``).

The base layer runs its own forward and backward into ``x``; the adapter runs beside it
(``lori_linear`` without a weight). So a LoRI layer over a quantized base must add exactly
the adapter that the same layer adds over any plain base, and give ``b_values`` the same
gradient.
"""

import copy

import pytest
import torch
from helpers import assert_error_earned
from transformers import LlamaConfig, LlamaForCausalLM

import lori
from lori import LoRIConfig, LoRILinear
from lori.bench.common import random_block_mask
from lori.checkpoint import base_fingerprint
from lori.layer import is_quantized
from lori.quantize import QUANTIZED_KINDS, quantize_base

pytest.importorskip("torchao")
pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore")  # bitsandbytes warns about its CPU kernels

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def quantized_linear(kind: str, dtype: torch.dtype) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """A plain ``nn.Linear`` and its quantized copy (as a model's only layer)."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 96).to(dtype).requires_grad_(False)
    holder = torch.nn.Sequential(torch.nn.Linear(64, 96)).to(dtype)
    holder[0].load_state_dict(plain.state_dict())
    return plain, quantize_base(holder, kind, group_size=32)[0]


def lori_layer(base: torch.nn.Module, b_values: torch.Tensor) -> LoRILinear:
    layer = LoRILinear(base, r=8, alpha=16, seed=5, block=(32, 8), dropout=0.1).train()
    layer.b_values.data.copy_(b_values)
    return layer


def forward_backward(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", QUANTIZED_KINDS)
def test_layer_adds_the_adapter_of_a_plain_base(kind, dtype):
    """y - base(x) and dx - the base's dx are the adapter's, as the same adapter over the plain
    layer gives them (dropout on: the same mask), within the plain layer's error against
    float64 (STYLE.md's earned tolerance); db_values is the plain layer's."""
    plain, base = quantized_linear(kind, dtype)
    assert is_quantized(base) and not is_quantized(plain)
    b_values = torch.randn(3, 32, 8)  # every block of B [96, 8]
    x, dy = torch.randn(2, 5, 64, dtype=torch.float64), torch.randn(2, 5, 96, dtype=torch.float64)
    plain64 = copy.deepcopy(plain).double()
    adapter = {}
    for name, layer in (("quantized", base), ("plain", plain), ("float64", plain64)):
        lori_part = lori_layer(layer, b_values)
        work = torch.float64 if name == "float64" else dtype
        xs, dys = x.to(work), dy.to(work)
        (y, dx), (y_base, dx_base) = forward_backward(lori_part, xs, dys), forward_backward(layer, xs, dys)
        adapter[name] = (y - y_base, dx - dx_base, lori_part.b_values.grad)
    assert adapter["quantized"][0].dtype == adapter["quantized"][1].dtype == dtype
    for got, same, truth in zip(adapter["quantized"][:2], adapter["plain"][:2], adapter["float64"][:2], strict=True):
        assert_error_earned(got, same, truth)
    # db_values depends on x, dy and A only: the base cannot change it.
    torch.testing.assert_close(adapter["quantized"][2], adapter["plain"][2], atol=0, rtol=0)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY))


@pytest.mark.parametrize("kind", QUANTIZED_KINDS)
def test_quantized_model_trains_saves_and_loads(kind, tmp_path):
    """Every projection quantized (not the head), LoRI-S on top: the loss falls over a few
    AdamW steps, the quantized base computes as it did, and the saved adapter loads onto a
    freshly quantized base with the same logits."""
    model = quantize_base(tiny_llama(), kind, group_size=32)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base_logits = model.eval()(ids).logits
    config = LoRIConfig(r=8, block=(16, 8), seed=3, sparsity=0.5, target_modules="all-linear")
    g = torch.Generator().manual_seed(1)
    masks = {name: random_block_mask(out, 8, (16, 8), 0.5, g) for name, out in _outs(model)}
    model = lori.get_lori_model(model, config, masks)
    layers = lori.lori_layers(model)
    assert len(layers) == 14 and all(is_quantized(layer.base_layer) for layer in layers.values())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad(), lori.disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
    with torch.no_grad():
        logits = model(ids).logits
    lori.save_lori(model, tmp_path / "adapter")
    fresh = quantize_base(tiny_llama(), kind, group_size=32)
    # The packing is no part of the base's identity: the adapter fits the unquantized model too.
    assert base_fingerprint(fresh) == base_fingerprint(tiny_llama())
    lori.load_lori(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids).logits, logits)


@pytest.mark.parametrize("kind", QUANTIZED_KINDS)
def test_parameter_counts_are_the_unquantized_models(kind):
    """print_trainable_parameters counts what a quantized weight stands for, as PEFT does
    (bitsandbytes' 4-bit weight holds two values per element)."""
    config = LoRIConfig(r=8, block=(16, 8), seed=3)
    plain = lori.print_trainable_parameters(lori.get_lori_model(tiny_llama(), config))
    assert lori.print_trainable_parameters(lori.get_lori_model(quantize_base(tiny_llama(), kind), config)) == plain


def test_quantizing_after_injection_keeps_the_adapter():
    """quantize_base on a LoRI model quantizes the base layers under the adapters."""
    model = lori.get_lori_model(tiny_llama(), LoRIConfig(r=8, block=(16, 8), seed=3))
    quantize_base(model, "int8")
    layers = lori.lori_layers(model)
    assert all(is_quantized(layer.base_layer) for layer in layers.values())
    assert not is_quantized(model.lm_head)
    ids = torch.randint(0, 97, (1, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.b_values.grad is not None for layer in layers.values())


def test_model_quantized_by_transformers_adapts(tmp_path):
    """A model that transformers quantized as it loaded it (``quantization_config``) is adapted
    like one of ``quantize_base``: only the weight's type is looked at."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    tiny_llama().save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    model = lori.get_lori_model(model, LoRIConfig(r=8, block=(16, 8), seed=3))
    assert all(is_quantized(layer.base_layer) for layer in lori.lori_layers(model).values())
    ids = torch.randint(0, 97, (1, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.b_values.grad is not None for layer in lori.lori_layers(model).values())


@pytest.mark.parametrize("kind", ["nf4", "bnb_nf4", "bnb_int8"])
def test_mixed_batch_over_a_quantized_base(kind, tmp_path):
    """``adapter_batch`` over a quantized base: each row as the model with only its adapter."""
    for k, name in enumerate(("a", "b")):
        model = lori.get_lori_model(tiny_llama(), LoRIConfig(r=8, block=(16, 8), seed=3))
        g = torch.Generator().manual_seed(k)
        for layer in lori.lori_layers(model).values():
            layer.b_values.data.copy_(torch.randn(layer.b_values.shape, generator=g) * 0.1)
        lori.save_lori(model, tmp_path / name)

    def loaded(*names):
        model = quantize_base(tiny_llama(), kind, group_size=32)
        for name in names:
            lori.load_lori(model, tmp_path / name, adapter_name=name)
        return model.eval()

    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(5))
    both = loaded("a", "b")
    with torch.no_grad(), lori.adapter_batch(both, ["b", None, "a"]):
        mixed = both(ids).logits
    with torch.no_grad():  # each on the whole batch: bitsandbytes' CPU kernels round by batch shape
        alone = {
            name: (loaded(name) if name else quantize_base(tiny_llama(), kind, group_size=32))(ids).logits
            for name in ("a", "b", None)
        }
    want = torch.stack([alone[name][i] for i, name in enumerate(["b", None, "a"])])
    # bitsandbytes' CPU inference packs NF4 weights for a bfloat16 kernel: a last-bit change
    # of a layer's input (the mixed batch sums in another order) can move a logit by ~1e-3.
    tol = dict(atol=1e-2, rtol=1e-2) if kind.startswith("bnb_") else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed, want, **tol)


@pytest.mark.parametrize("kind", ["int8", "bnb_nf4"])
def test_folding_into_a_quantized_base_is_refused(kind):
    model = lori.get_lori_model(quantize_base(tiny_llama(), kind), LoRIConfig(r=8, block=(16, 8), seed=3))
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(ValueError, match=r"cannot fold into model\.layers\.0\.self_attn\.q_proj: .* is quantized"):
        lori.merge_adapter(model)
    with pytest.raises(ValueError, match="is quantized"):
        lori.merge_and_unload(model)
    assert all(layer.fold is None for layer in lori.lori_layers(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)


def test_bad_kind_and_group_size_are_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        quantize_base(tiny_llama(), "int3")
    for kind in ("int4", "nf4", "bnb_nf4"):
        model = LlamaForCausalLM(LlamaConfig(**{**TINY, "intermediate_size": 96}))
        with pytest.raises(ValueError, match=r"layers.0.mlp.down_proj has 96 inputs, not a multiple of group_size 64;"):
            quantize_base(model, kind, group_size=64)
        assert not any(is_quantized(m) for m in model.modules() if isinstance(m, torch.nn.Linear))  # not even q_proj


def _outs(model) -> list[tuple[str, int]]:
    return [(name, m.out_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:-1]
