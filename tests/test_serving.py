"""Several named adapters in one model (load, set, delete, save) and mixed-adapter batches
(``lori.adapter_batch``): every row as the model with only its adapter gives it."""

import copy

import pytest
import torch
from test_model import TINY
from transformers import LlamaConfig, LlamaForCausalLM

import lori
import lori_kernels
from lori import CheckpointError, LoRIConfig

TARGETS = ("q_proj", "v_proj", "down_proj")
# name -> (seed, r, block, alpha, kept fraction of blocks). a, b and c share one A (seed 5,
# r 8): one shrink; c has other blocks (its own expand); d has another seed and rank.
ADAPTERS = {
    "a": (5, 8, (16, 8), 16.0, 0.5),
    "b": (5, 8, (16, 8), 8.0, 0.5),
    "c": (5, 8, (32, 4), 16.0, 1.0),
    "d": (9, 4, (16, 4), 4.0, 0.5),
}
BACKENDS = ["reference", "cpu_ext", "triton"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tiny ops run ~1000x slower with two threads on a busy
    two-core machine (a thread pool waiting for a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def _masks(model, config, g):
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in config.target_modules:
            n_rows, n_cols = lori_kernels.block_sparse.block_grid(module.out_features, config.r, config.block)
            kept = torch.rand(n_rows, n_cols, generator=g) >= config.sparsity
            kept[0, 0] = True
            bo, br = config.block
            masks[name] = kept.repeat_interleave(bo, 0).repeat_interleave(br, 1)[: module.out_features]
    return masks


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each adapter of ``ADAPTERS`` saved from its own model (random kept blocks and values)."""
    root = tmp_path_factory.mktemp("adapters")
    for k, (name, (seed, r, block, alpha, keep)) in enumerate(ADAPTERS.items()):
        g = torch.Generator().manual_seed(100 + k)
        model = tiny_model()
        config = LoRIConfig(r=r, alpha=alpha, block=block, seed=seed, target_modules=TARGETS, sparsity=1 - keep)
        lori.get_lori_model(model, config, _masks(model, config, g) if keep < 1 else None)
        for layer in lori.lori_layers(model).values():
            with torch.no_grad():
                layer.b_values.copy_(torch.randn(layer.b_values.shape, generator=g) * 0.5)
        lori.save_lori(model, root / name)
    return root


def backend_or_skip(backend):
    if backend not in lori_kernels.available_backends("lori_linear_multi"):
        pytest.skip(f"the {backend} backend is not available here")
    return backend


def only(saved, name, backend="reference"):
    """The model with only adapter ``name`` loaded (or the base for None)."""
    model = tiny_model()
    return model if name is None else lori.load_lori(model, saved / name, backend=backend)


def with_adapters(saved, names, backend="reference"):
    model = tiny_model()
    for name in names:
        lori.load_lori(model, saved / name, adapter_name=name, backend=backend)
    return model


# ----------------------------------------------------------------------------------------
# Named adapters


def test_named_adapters_load_beside_set_and_delete(saved):
    model = with_adapters(saved, ["a"])
    base = {n: (p, p._version) for n, p in model.named_parameters() if "b_values" not in n}
    a_values = {n: (layer.b_values, layer.b_values._version) for n, layer in lori.lori_layers(model).items()}
    for name in ("b", "d"):
        lori.load_lori(model, saved / name, adapter_name=name)
    assert lori.list_adapters(model) == ["a", "b", "d"]
    assert lori.active_adapter(model) == "a"  # loading beside does not activate (PEFT's load_adapter)
    # Neither the base nor adapter a was reloaded or copied into.
    after = {n: p for n, p in model.named_parameters() if "b_values" not in n}
    assert all(after[n] is p and p._version == v for n, (p, v) in base.items())
    assert all(lori.lori_layers(model)[n].b_values is p and p._version == v for n, (p, v) in a_values.items())

    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = {name: only(saved, name)(ids).logits for name in ("a", "b", "d")}
        for name in ("d", "b", "a"):
            lori.set_adapter(model, name)
            torch.testing.assert_close(model(ids).logits, want[name], rtol=0, atol=0)
        lori.set_adapter(model, "b")
        with pytest.raises(ValueError, match="the active adapter 'b' is not the model's first"):
            lori.merge_adapter(model)  # it would fold a, the layers' own
        lori.delete_adapter(model, "a")  # the layers' own: b moves into its place, still active
        assert lori.list_adapters(model) == ["b", "d"] and lori.active_adapter(model) == "b"
        assert model.lori_config.alpha == ADAPTERS["b"][3]
        torch.testing.assert_close(model(ids).logits, want["b"], rtol=0, atol=0)
        lori.delete_adapter(model, "b")
        assert lori.list_adapters(model) == ["d"] and lori.active_adapter(model) == "d"
        torch.testing.assert_close(model(ids).logits, want["d"], rtol=0, atol=0)
        lori.delete_adapter(model, "d")
        assert lori.list_adapters(model) == [] and not lori.lori_layers(model)
        torch.testing.assert_close(model(ids).logits, tiny_model()(ids).logits, rtol=0, atol=0)


def test_save_a_named_adapter_writes_what_it_loaded(saved, tmp_path):
    model = with_adapters(saved, ["a", "d"])
    lori.save_lori(model, tmp_path / "d", adapter_name="d")
    lori.save_lori(model, tmp_path / "a", adapter_name="a")
    for name in ("a", "d"):
        written, original = lori.checkpoint.read_lori(tmp_path / name), lori.checkpoint.read_lori(saved / name)
        assert written.manifest["config"] == original.manifest["config"]
        for layer, tensors in original.layers.items():
            for kind, value in tensors.items():
                assert torch.equal(written.layers[layer][kind], value), (name, layer, kind)
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        lori.save_lori(model, tmp_path / "x", adapter_name="x")


def test_an_adapter_of_other_modules_or_a_taken_name_is_refused(saved, tmp_path):
    other = tiny_model()
    lori.get_lori_model(other, LoRIConfig(r=8, block=(16, 8), seed=5, target_modules=("q_proj",)))
    lori.save_lori(other, tmp_path / "q_only")
    model = with_adapters(saved, ["a"])
    with pytest.raises(CheckpointError, match="adapts other modules than the model's adapters"):
        lori.load_lori(model, tmp_path / "q_only", adapter_name="q")
    with pytest.raises(CheckpointError, match="already has an adapter named 'a'"):
        lori.load_lori(model, saved / "b", adapter_name="a")
    narrow = LlamaForCausalLM(LlamaConfig(**dict(TINY, intermediate_size=48))).eval()
    lori.get_lori_model(narrow, LoRIConfig(r=8, block=(16, 8), seed=5, target_modules=TARGETS))
    lori.save_lori(narrow, tmp_path / "narrow")
    with pytest.raises(CheckpointError, match=r"down_proj is \[64, 96\] in the model but \[64, 48\]"):
        lori.load_lori(model, tmp_path / "narrow", adapter_name="narrow", check_base=False)
    assert lori.list_adapters(model) == ["a"]
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        lori.set_adapter(model, "zz")


# ----------------------------------------------------------------------------------------
# Mixed batches


def _rows(names, n_rows):
    """Row i's adapter: the names in turn, the base (None) in every third row."""
    return [None if i % 3 == 2 else names[i % len(names)] for i in range(n_rows)]


def test_mixed_forward_equals_each_adapter_alone(saved):
    names = list(ADAPTERS)
    model = with_adapters(saved, names)
    rows = _rows(names, 7)
    ids = torch.randint(0, 97, (len(rows), 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), lori.adapter_batch(model, rows):
        logits = model(ids).logits
    with torch.no_grad():
        for i, name in enumerate(rows):
            torch.testing.assert_close(logits[i], only(saved, name)(ids[i : i + 1]).logits[0], rtol=1e-5, atol=1e-5)
    assert all(layer.mixed_batch is None for layer in lori.lori_layers(model).values())


def _generate(model, ids, new_tokens=3, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_adapters", [1, 2, 4])
def test_mixed_greedy_generate_equals_each_adapter_alone(saved, backend, n_adapters):
    backend_or_skip(backend)
    names = list(ADAPTERS)[:n_adapters]
    model = with_adapters(saved, names, backend)
    rows = _rows(names, max(3, n_adapters + 1))
    ids = torch.randint(0, 97, (len(rows), 5), generator=torch.Generator().manual_seed(n_adapters))
    new_tokens = 2 if backend == "triton" else 3  # prefill and decode with the cache; the interpreter is slow
    with lori.adapter_batch(model, rows):
        mixed = _generate(model, ids, new_tokens, do_sample=False)
        if backend != "triton":  # the CPU shrinks' A, made at the first step and kept for the others
            packs = [layer.mixed_batch.packed for layer in lori.lori_layers(model).values()]
            assert [len(p._a) for p in packs] == [len(p.groups) for p in packs]
    for name in set(rows):  # the rows of one adapter in one batch
        mine = [i for i, n in enumerate(rows) if n == name]
        want = _generate(only(saved, name, backend), ids[mine], new_tokens, do_sample=False)
        assert torch.equal(mixed[mine], want), name
    if n_adapters > 1:  # the adapters do change the answers, so the test tells rows apart
        assert len({tuple(mixed[i].tolist()) for i in range(len(rows))}) > 1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=False, use_cache=False),
        dict(do_sample=False, num_beams=2),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
        dict(do_sample=True, top_k=1, num_return_sequences=2),  # sampling's path, every row expanded
    ],
    ids=["no-cache", "beams", "beams-returns", "sampling-returns"],
)
def test_mixed_generate_follows_source_rows(saved, kwargs):
    names = ["a", "b", "d"]
    model = with_adapters(saved, names)
    rows = ["d", None, "a", "b"]
    ids = torch.randint(0, 97, (len(rows), 5), generator=torch.Generator().manual_seed(2))
    with lori.adapter_batch(model, rows):
        mixed = _generate(model, ids, **kwargs)
    k = kwargs.get("num_return_sequences", 1)
    for i, name in enumerate(rows):
        want = _generate(only(saved, name), ids[i : i + 1], **kwargs)
        assert torch.equal(mixed[i * k : (i + 1) * k], want), (i, name)


def test_sampling_a_mixed_batch_of_one_adapter_draws_as_the_adapter_alone(saved):
    model, alone = with_adapters(saved, ["a", "b"]), only(saved, "b")
    ids = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    with lori.adapter_batch(model, ["b"] * 3):
        mixed = _generate(model, ids, do_sample=True, num_return_sequences=2)
    torch.manual_seed(7)
    assert torch.equal(mixed, _generate(alone, ids, do_sample=True, num_return_sequences=2))


def test_adapter_batch_refuses_what_it_cannot_serve(saved):
    model = with_adapters(saved, ["a", "b"])
    ids = torch.randint(0, 97, (3, 4))
    with pytest.raises(ValueError, match=r"does not have: \['x'\]"):
        with lori.adapter_batch(model, ["a", "x"]):
            pass
    with pytest.raises(ValueError, match="the batch has 3 rows but adapter_batch was given 2 names"):
        with torch.no_grad(), lori.adapter_batch(model, ["a", "b"]):
            model(ids)
    model.train()
    with pytest.raises(ValueError, match="for inference: call model.eval"):
        with lori.adapter_batch(model, ["a", "b", None]):
            pass
    model.eval()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with pytest.raises(RuntimeError, match="inference only"):
        with lori.adapter_batch(model, ["a", "b", None]):
            model(inputs_embeds=embeds)
    assert all(layer.mixed_batch is None for layer in lori.lori_layers(model).values())
    with torch.no_grad():  # still the single-adapter model afterwards
        torch.testing.assert_close(model(ids).logits, only(saved, "a")(ids).logits, rtol=0, atol=0)


def test_a_model_copy_keeps_its_named_adapters(saved):
    model = with_adapters(saved, ["a", "d"])
    twin = copy.deepcopy(model)
    lori.delete_adapter(twin, "d")
    assert lori.list_adapters(model) == ["a", "d"] and lori.list_adapters(twin) == ["a"]
