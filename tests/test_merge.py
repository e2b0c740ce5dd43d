"""Merging: folding into the base weights (exactly undoable), combining adapters against
PEFT's add_weighted_adapter and dense math, the compact same-seed merge."""

import peft
import pytest
import torch
from helpers import assert_bitwise_equal
from test_model import randomize_b, tiny_model
from test_peft_interop import logits, lori_s_model

import lori
from lori import LoRIConfig
from lori.merge import combine, default_weights, delta_weight, read_adapter
from lori_kernels import available_backends


def weights_of(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "b_values" not in k}


@pytest.mark.parametrize("backend", ["reference", "cpu_ext"])
def test_delta_weight_is_dense_math(backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not built")
    model = lori.get_lori_model(tiny_model(), lori_s_model().lori_config, backend=backend)
    randomize_b(model)
    for layer in lori.lori_layers(model).values():
        want = layer.scaling * layer.b_dense().double() @ layer.a().double()
        torch.testing.assert_close(delta_weight(layer).double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(delta_weight(layer, slice(5, 37)), delta_weight(layer)[:, 5:37], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fold_gives_the_adapter_outputs_and_unfolds_bit_for_bit(dtype):
    model = lori_s_model().to(dtype)
    before = weights_of(model)
    with_adapter = logits(model).float()
    lori.merge_adapter(model)
    folded = logits(model).float()
    tol = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 2e-2}[dtype]
    torch.testing.assert_close(folded, with_adapter, rtol=tol, atol=tol)
    changed = [k for k, v in weights_of(model).items() if not torch.equal(v, before[k])]
    assert changed and all("base_layer.weight" in k for k in changed)
    lori.merge_adapter(model)  # already folded: nothing happens
    lori.unmerge_adapter(model)
    after = weights_of(model)
    for k in before:
        assert_bitwise_equal(after[k], before[k])
    torch.testing.assert_close(logits(model).float(), with_adapter, rtol=0, atol=0)


def test_fold_refuses_non_finite_results_and_changes_nothing():
    model = lori_s_model()
    before = weights_of(model)
    last = [name for name, layer in lori.lori_layers(model).items() if layer.b_values.shape[0]][-1]
    with torch.no_grad():
        lori.lori_layers(model)[last].b_values.fill_(float("inf"))
    with pytest.raises(ValueError, match=rf"{last}: folding gives NaN or Inf; nothing was folded"):
        lori.merge_adapter(model)
    assert all(torch.equal(v, before[k]) for k, v in weights_of(model).items())
    assert all(layer.fold is None for layer in lori.lori_layers(model).values())


def test_unfold_after_training_the_folded_adapter_is_refused():
    model = lori_s_model()
    lori.merge_adapter(model)
    with torch.no_grad():
        next(iter(lori.lori_layers(model).values())).b_values.add_(1.0)
    with pytest.raises(ValueError, match="b_values changed since the adapter was folded"):
        lori.unmerge_adapter(model)


def test_merge_and_unload_leaves_a_plain_model():
    model = lori_s_model()
    want = logits(model)
    plain = lori.merge_and_unload(model)
    assert not lori.lori_layers(plain) and not hasattr(plain, "lori_config")
    assert all(p.requires_grad for p in plain.parameters())
    torch.testing.assert_close(logits(plain), want, rtol=1e-4, atol=1e-4)


def saved_adapters(tmp_path, seeds, sparsity=0.75):
    paths = []
    for i, seed in enumerate(seeds):
        model = lori_s_model(sparsity, seed=seed) if sparsity else lori.get_lori_model(tiny_model(), LoRIConfig(r=8))
        if not sparsity:
            randomize_b(model, seed)
        # Different B and masks per adapter even when the seeds (the A) are shared.
        randomize_b(model, 100 + i)
        paths.append(lori.save_lori(model, tmp_path / f"adapter{i}"))
    return paths


def peft_merged(tmp_path, paths, weights, combination):
    """PEFT's add_weighted_adapter on our adapters exported to PEFT."""
    exported = []
    for path in paths:
        exported.append(lori.export_peft(lori.load_lori(tiny_model(), path), tmp_path / f"peft-{path.name}"))
    model = peft.PeftModel.from_pretrained(tiny_model(), exported[0], adapter_name="a0")
    for i, path in enumerate(exported[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(paths))], weights, "merged", combination_type=combination)
    model.set_adapter("merged")
    return model.eval()


@pytest.mark.parametrize("combination", ["cat", "linear"])
@pytest.mark.parametrize("shared_seed", [False, True])
def test_merge_matches_peft_add_weighted_adapter(tmp_path, combination, shared_seed):
    paths = saved_adapters(tmp_path, [3, 3] if shared_seed else [3, 4])
    weights = [0.7, -0.4]
    ours = lori.merge(tiny_model(), paths, weights=weights, combination=combination)
    layers = lori.lori_layers(ours)
    assert all((layer.stored_a is None) == shared_seed for layer in layers.values())
    torch.testing.assert_close(
        logits(ours), logits(peft_merged(tmp_path, paths, weights, combination)), rtol=1e-4, atol=1e-5
    )


def test_same_seed_merge_is_exact_and_compact(tmp_path):
    paths = saved_adapters(tmp_path, [3, 3, 3])
    weights = [0.5, 0.3, 0.2]
    sources = [lori.lori_layers(lori.load_lori(tiny_model(), p)) for p in paths]
    merged = lori.merge(tiny_model(), paths, weights=weights)
    for name, layer in lori.lori_layers(merged).items():
        parts = [src[name] for src in sources]
        assert layer.layer_seed == parts[0].layer_seed and layer.stored_a is None and layer.scaling == 1.0
        # Kept blocks: the union of the inputs' blocks, nothing more.
        union = torch.stack([p.mask() for p in parts]).any(0)
        assert torch.equal(layer.mask(), union)
        want = sum(w * p.scaling * p.b_dense().double() for w, p in zip(weights, parts, strict=True))
        torch.testing.assert_close(layer.b_dense().double(), want, rtol=1e-6, atol=1e-7)
        dense = sum(w * delta_weight(p).double() for w, p in zip(weights, parts, strict=True))
        torch.testing.assert_close(delta_weight(layer).double(), dense, rtol=1e-5, atol=1e-6)
    lori.save_lori(merged, tmp_path / "merged")
    size = (tmp_path / "merged" / "adapter.safetensors").stat().st_size
    assert size < sum((p / "adapter.safetensors").stat().st_size for p in paths)


def test_cat_of_different_seeds_is_dense_math_with_stored_a(tmp_path):
    paths = saved_adapters(tmp_path, [3, 4])
    sources = [lori.lori_layers(lori.load_lori(tiny_model(), p)) for p in paths]
    merged = lori.merge(tiny_model(), paths, weights=[1.0, 0.5])
    for name, layer in lori.lori_layers(merged).items():
        assert layer.r == 16 and layer.stored_a is not None
        dense = delta_weight(sources[0][name]).double() + 0.5 * delta_weight(sources[1][name]).double()
        torch.testing.assert_close(delta_weight(layer).double(), dense, rtol=1e-5, atol=1e-6)
    again = lori.load_lori(tiny_model(), lori.save_lori(merged, tmp_path / "merged"))
    torch.testing.assert_close(logits(again), logits(merged), rtol=0, atol=0)


def test_default_weights_are_the_original_scripts(tmp_path, caplog):
    """merge_3_loras.sh: 0.5 per LoRI-D, 0.4 per LoRI-S adapter; merge_4_loras.sh: 0.4 and 0.3.
    A LoRI-S adapter in PEFT format (no masks: B dense with exact zeros, as the original code
    writes it) counts as LoRI-S."""
    caplog.set_level("INFO", logger="lori.merge")
    sparse = [read_adapter(p)[1] for p in saved_adapters(tmp_path / "s", [3, 4, 5, 6])]
    dense = [read_adapter(p)[1] for p in saved_adapters(tmp_path / "d", [3, 4, 5, 6], sparsity=None)]
    assert default_weights(sparse[:3]) == [0.4] * 3 and default_weights(dense[:3]) == [0.5] * 3
    assert default_weights(sparse) == [0.3] * 4 and default_weights(dense) == [0.4] * 4
    assert default_weights([sparse[0], dense[0]]) == [0.4, 0.5]
    assert "the original LoRI scripts' for up to 3 adapters of kinds ['LoRI-S', 'LoRI-D']" in caplog.text
    model = lori.load_lori(tiny_model(), saved_adapters(tmp_path / "p", [3])[0])
    peft_format = read_adapter(lori.export_peft(model, tmp_path / "peft"))[1]
    assert all(u.mask.all() for u in peft_format.values())  # no masks in a PEFT adapter...
    assert default_weights([peft_format]) == [0.4]  # ...but 75% of its B is exact zeros: LoRI-S


def test_merge_with_fold_and_bad_requests(tmp_path):
    paths = saved_adapters(tmp_path, [3, 4])
    adapter = lori.merge(tiny_model(), paths, weights=[1.0, 1.0])
    plain = lori.merge(tiny_model(), paths, weights=[1.0, 1.0], fold=True)
    assert not lori.lori_layers(plain)
    torch.testing.assert_close(logits(plain), logits(adapter), rtol=1e-4, atol=1e-4)
    updates = [read_adapter(p)[1] for p in paths]
    with pytest.raises(ValueError, match="combination must be one of"):
        combine(updates, [1, 1], "ties")
    with pytest.raises(ValueError, match="one weight per adapter"):
        combine(updates, [1], "cat")
    with pytest.raises(ValueError, match="finite"):
        combine(updates, [1, float("nan")], "cat")
    r16 = lori.get_lori_model(tiny_model(), LoRIConfig(r=16))
    with pytest.raises(ValueError, match="linear merging needs adapters of one rank"):
        lori.merge(tiny_model(), [paths[0], lori.save_lori(r16, tmp_path / "r16")], combination="linear")
    with pytest.raises(ValueError, match="is neither a LoRI checkpoint"):
        lori.merge(tiny_model(), [tmp_path])
    with pytest.raises(ValueError, match="already has LoRI adapters"):
        lori.merge(adapter, paths)


def test_merge_checks_the_base_model_like_load_lori(tmp_path):
    """An adapter of a 2-layer model used to merge into a 3-layer base (same layer shapes)."""
    from test_model import TINY
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = saved_adapters(tmp_path, [3])
    deeper = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 3}))
    with pytest.raises(lori.CheckpointError, match="was trained on another base model"):
        lori.merge(deeper, paths)
    assert not lori.lori_layers(deeper)
    lori.merge(deeper, paths, check_base=False)  # asked for: the layers exist with the same shapes
    assert len(lori.lori_layers(deeper)) == 14
