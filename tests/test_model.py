"""LoRILinear and its injection into Hugging Face causal LMs (tiny configs built here)."""

import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import lori
import lori_kernels
from lori import LoRIConfig, LoRILinear
from lori_kernels import rng

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_model(kind="llama", seed=0):
    torch.manual_seed(seed)
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[kind]
    return model_cls(config_cls(**TINY)).eval()


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for layer in lori.lori_layers(model).values():
        with torch.no_grad():
            layer.b_values.copy_(torch.randn(layer.b_values.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_injection_into_hf_models(kind):
    model = tiny_model(kind)
    ids = torch.randint(0, 97, (2, 9))
    before = model(ids).logits
    config = LoRIConfig(r=8, block=(16, 8), seed=5)
    lori.get_lori_model(model, config)
    layers = lori.lori_layers(model)
    assert len(layers) == 7 * 2
    assert all(isinstance(m, LoRILinear) for m in layers.values())
    for name, layer in layers.items():
        assert layer.layer_seed == rng.layer_seed(5, name)
        assert layer.layer_seed == rng.to_uint64(layer.seed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.b_values" for n in layers}
    torch.testing.assert_close(model(ids).logits, before)  # B = 0 at creation
    randomize_b(model)
    after = model(ids).logits
    assert not torch.allclose(after, before)
    with lori.disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, before)
    lori.remove_lori(model)
    assert not lori.lori_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(ids).logits, before)


def test_same_outputs_as_peft_with_the_same_a_and_b():
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, 97, (2, 9))
    ours = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 8)))
    randomize_b(ours)
    theirs = peft.get_peft_model(
        tiny_model(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(lori.DEFAULT_TARGET_MODULES))
    )
    with torch.no_grad():
        for name, layer in lori.lori_layers(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.a())
            peft_layer.lora_B["default"].weight.copy_(layer.b_dense())
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits)


def test_masks_make_lori_s():
    model = tiny_model()
    config = LoRIConfig(r=8, block=(16, 8))
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in lori.DEFAULT_TARGET_MODULES
    ]
    masks = {}
    for i, name in enumerate(names):
        out = model.get_submodule(name).out_features
        mask = torch.zeros(out, 8, dtype=torch.bool)
        mask[16 * (i % 2) : 16 * (i % 2) + 16] = True
        masks[name] = mask
    lori.get_lori_model(model, config, masks=masks)
    for name, layer in lori.lori_layers(model).items():
        assert layer.b_values.shape == (1, 16, 8)
        assert torch.equal(layer.mask(), masks[name])
    trainable, total = lori.print_trainable_parameters(model)
    assert trainable == len(names) * 16 * 8


def test_bad_masks_and_configs_are_named():
    config = LoRIConfig(r=8, block=(16, 8))
    names = [n for n, m in tiny_model().named_modules() if isinstance(m, torch.nn.Linear) and n.endswith("proj")]
    full = {n: torch.ones(tiny_model().get_submodule(n).out_features, 8, dtype=torch.bool) for n in names}
    with pytest.raises(ValueError, match="masks are missing for adapted modules"):
        lori.get_lori_model(tiny_model(), config, masks=dict(list(full.items())[:3]))
    with pytest.raises(ValueError, match="not adapted"):
        lori.get_lori_model(tiny_model(), config, masks={**full, "lm_head": torch.ones(97, 8, dtype=torch.bool)})
    bad = dict(full)
    bad[names[0]] = torch.ones(5, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"mask of {names[0]} must be a bool tensor of shape"):
        lori.get_lori_model(tiny_model(), config, masks=bad)
    partial = dict(full)
    partial[names[0]] = full[names[0]].clone()
    partial[names[0]][0, 0] = False
    with pytest.raises(ValueError, match=rf"mask of {names[0]}: mask is not made of whole \(16, 8\) blocks"):
        lori.get_lori_model(tiny_model(), config, masks=partial)
    with pytest.raises(ValueError, match="select no nn.Linear of the model"):
        lori.get_lori_model(tiny_model(), LoRIConfig(r=8, target_modules=["nope"]))
    model = lori.get_lori_model(tiny_model(), config)
    with pytest.raises(ValueError, match="already has LoRI adapters"):
        lori.get_lori_model(model, config)
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRILinear(torch.nn.Conv1d(3, 3, 1), r=4, alpha=8, seed=0)


def test_state_dict_carries_seed_and_blocks():
    model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 8), seed=1))
    randomize_b(model)
    state = {k: v for k, v in model.state_dict().items() if k.endswith(("seed", "b_values", "b_blocks"))}
    assert len(state) == 3 * 14
    other = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 8), seed=2))
    other.load_state_dict(state, strict=False)
    for name, layer in lori.lori_layers(other).items():
        assert layer.layer_seed == rng.layer_seed(1, name)  # the host copy follows the buffer
    ids = torch.randint(0, 97, (1, 7))
    torch.testing.assert_close(other(ids).logits, model(ids).logits)


def test_dropout_under_activation_checkpointing():
    """With dropout, a checkpointed model recomputes the same masks: same gradients."""
    grads = []
    for checkpointing in (False, True):
        model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 8), dropout=0.3)).train()
        randomize_b(model)
        if checkpointing:
            lori.enable_activation_checkpointing(model)
        ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([layer.b_values.grad.clone() for layer in lori.lori_layers(model).values()])
        assert all(layer.dropout_calls == 1 for layer in lori.lori_layers(model).values())
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_dropout_masks_change_between_steps_and_not_in_eval():
    layer = LoRILinear(torch.nn.Linear(32, 32), r=8, alpha=16, seed=3, block=(16, 8), dropout=0.5)
    with torch.no_grad():
        layer.b_values.normal_()
    x = torch.randn(4, 32)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_one_adamw_step_equals_peft_with_masked_gradient():
    """LoRI-S on compact b_values takes the step of the original LoRI: PEFT LoRA with B
    dense, A frozen, B's gradient masked, AdamW (weight decay 0)."""
    peft = pytest.importorskip("peft")
    config = LoRIConfig(r=8, block=(16, 8))
    model = tiny_model()
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(lori.DEFAULT_TARGET_MODULES)
    ]
    g = torch.Generator().manual_seed(3)
    masks = {}
    for n in names:
        out = model.get_submodule(n).out_features
        rows = torch.rand(-(-out // 16), generator=g) < 0.5
        masks[n] = rows.repeat_interleave(16)[:out, None].expand(out, 8).clone()
    ours = lori.get_lori_model(model, config, masks=masks).train()
    randomize_b(ours)
    theirs = peft.get_peft_model(
        tiny_model(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=config.target_modules)
    ).train()
    with torch.no_grad():
        for name, layer in lori.lori_layers(ours).items():
            p = theirs.base_model.model.get_submodule(name)
            p.lora_A["default"].weight.copy_(layer.a())
            p.lora_A["default"].weight.requires_grad_(False)
            p.lora_B["default"].weight.copy_(layer.b_dense())
    ids = torch.randint(0, 97, (2, 11), generator=g)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        for model_, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            model_(input_ids=ids, labels=ids).loss.backward()
            if model_ is theirs:
                for name in names:
                    b = theirs.base_model.model.get_submodule(name).lora_B["default"].weight
                    b.grad.mul_(masks[name])
            opt.step()
    for name, layer in lori.lori_layers(ours).items():
        peft_b = theirs.base_model.model.get_submodule(name).lora_B["default"].weight
        torch.testing.assert_close(layer.b_dense(), peft_b.detach() * masks[name], rtol=1e-4, atol=1e-6)
        assert torch.equal(peft_b.detach()[~masks[name]], torch.zeros_like(peft_b)[~masks[name]])


def test_layer_keeps_its_block_indices_contiguous():
    """Kernels need contiguous b_blocks; nonzero() and transposes give strided ones."""
    blocks = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32).t().contiguous().t()
    assert not blocks.is_contiguous()
    layer = LoRILinear(torch.nn.Linear(8, 64), r=8, alpha=16, seed=1, block=(32, 4), b_blocks=blocks)
    assert layer.b_blocks.is_contiguous()
    from lori.merge import delta_weight

    assert delta_weight(layer).shape == (64, 8)


def test_cpu_adapters_over_a_meta_base_save_like_real_ones(tmp_path):
    """A model too large to load: its shapes on the meta device, the adapters real on the CPU."""
    with torch.device("meta"):
        meta = LlamaForCausalLM(LlamaConfig(**TINY))
    config = LoRIConfig(r=8, block=(16, 8), seed=5)
    lori.get_lori_model(meta, config, device="cpu")
    randomize_b(meta)
    assert all(layer.b_values.device.type == "cpu" for layer in lori.lori_layers(meta).values())
    real = lori.get_lori_model(tiny_model(), config)
    randomize_b(real)
    lori.save_lori(meta, tmp_path / "meta")
    lori.save_lori(real, tmp_path / "real")
    assert (tmp_path / "meta" / "adapter.safetensors").read_bytes() == (
        tmp_path / "real" / "adapter.safetensors"
    ).read_bytes()


def train_steps(model, steps=3, seed=0):
    """Training steps (forward + backward, no update) of a model: losses and b_values grads."""
    g = torch.Generator().manual_seed(seed)
    losses, grads = [], []
    for _ in range(steps):
        ids = torch.randint(0, 97, (2, 9), generator=g)
        for layer in lori.lori_layers(model).values():
            layer.b_values.grad = None
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([layer.b_values.grad.clone() for layer in lori.lori_layers(model).values()])
    return losses, grads


@pytest.mark.parametrize(
    "backend, compiler",
    [
        ("auto", "aot_eager"),
        ("reference", "aot_eager"),
        pytest.param(
            "auto",
            "inductor",
            marks=pytest.mark.skipif(not shutil.which("c++"), reason="inductor needs a C++ compiler"),
        ),
    ],
)
def test_dropout_compiles_fullgraph_once_and_draws_the_eager_masks(backend, compiler):
    """torch.compile(fullgraph=True) of a model with dropout: one compilation for every
    step (the count of forwards is a tensor), the masks of eager mode."""
    config = LoRIConfig(r=8, block=(16, 8), dropout=0.1)
    eager = lori.get_lori_model(tiny_model(), config, backend=backend).train()
    model = lori.get_lori_model(tiny_model(), config, backend=backend).train()
    randomize_b(eager)
    randomize_b(model)
    want = train_steps(eager)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = train_steps(torch.compile(model, backend=compiler, fullgraph=True))
    torch.testing.assert_close(got, want)
    assert int(model.dropout_calls) == int(eager.dropout_calls) == 3


@pytest.mark.parametrize("stored_a", [False, True])
def test_dropout_of_a_layer_on_its_own_compiles_once(stored_a):
    """A LoRILinear on its own counts its own forwards, also under torch.compile; the
    stored-A path (plain torch) draws its mask from the same seed tensor."""
    a = torch.randn(8, 32) if stored_a else None
    layers = [LoRILinear(torch.nn.Linear(32, 48), r=8, alpha=16, seed=3, block=(16, 8), dropout=0.5, a=a) for _ in "ab"]
    for layer in layers:
        layer.load_state_dict(layers[0].state_dict())
        with torch.no_grad():
            layer.b_values.copy_(torch.linspace(-1, 1, layer.b_values.numel()).reshape(layer.b_values.shape))
    x = torch.randn(5, 32)

    def steps(layer):
        out = []
        for _ in range(3):
            layer.b_values.grad = None
            y = layer(x)
            y.square().sum().backward()
            out.append((y.detach(), layer.b_values.grad.clone()))
        return out

    want = steps(layers[0])
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = steps(torch.compile(layers[1], backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(got, want)
    assert not torch.equal(want[0][0], want[1][0])  # a fresh mask every step


def test_eager_dropout_masks_are_those_of_the_v1_derivation(monkeypatch):
    """The n-th training forward of the model (n from 1) on rank k draws each layer's mask
    from splitmix64(layer_seed ^ splitmix64(n + (k << 40))), as checkpoints of earlier
    versions did; evaluation forwards do not count."""
    model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 8), dropout=0.3)).train()
    randomize_b(model)
    name = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    seen = []
    layer.register_forward_hook(lambda module, args, y: seen.append((args[0].detach(), y.detach())))
    ids = torch.randint(0, 97, (2, 9))
    model(ids)
    model.eval()
    model(ids)
    model.train()
    monkeypatch.setattr(lori.layer, "_rank", lambda: 3)
    model(ids)
    assert int(model.dropout_calls) == 2
    m64 = 2**64 - 1
    for (x, y), calls, rank in zip([seen[0], seen[2]], (1, 2), (0, 3), strict=True):
        seed = rng.splitmix64(rng.layer_seed(0, name) ^ rng.splitmix64(calls + (rank << 40))) & m64
        assert rng.dropout_seed(rng.layer_seed(0, name), calls, rank) == seed
        want = lori_kernels.lori_linear(
            x,
            layer.base_layer.weight,
            layer.base_layer.bias,
            layer.layer_seed,
            layer.b_values.detach(),
            layer.b_blocks,
            r=8,
            block=(16, 8),
            scaling=layer.scaling,
            dropout_p=0.3,
            dropout_seed=seed,
        )
        torch.testing.assert_close(y, want)


def test_set_dropout_calls_resumes_the_masks():
    """After set_dropout_calls(model, n) the next forward draws the masks of forward n + 1."""
    config = LoRIConfig(r=8, block=(16, 8), dropout=0.3)
    ids = torch.randint(0, 97, (2, 9))
    first = lori.get_lori_model(tiny_model(), config).train()
    randomize_b(first)
    logits = [first(ids).logits for _ in range(3)]
    resumed = lori.get_lori_model(tiny_model(), config).train()
    randomize_b(resumed)
    lori.set_dropout_calls(resumed, 2)
    torch.testing.assert_close(resumed(ids).logits, logits[2])
    assert not torch.allclose(logits[1], logits[2])
    lori.remove_lori(resumed)
    assert not hasattr(resumed, "dropout_calls") and not resumed._forward_pre_hooks


class Blocks(torch.nn.Module):
    """Two blocks of two linears (q_proj, v_proj), each run under non-reentrant activation
    checkpointing or not."""

    def __init__(self, checkpointing: bool):
        super().__init__()
        torch.manual_seed(0)
        self.checkpointing = checkpointing
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict(dict(q_proj=torch.nn.Linear(32, 64), v_proj=torch.nn.Linear(64, 32))) for _ in range(2)
        )

    def forward(self, x):
        for block in self.blocks:

            def run(x, block=block):
                return x + block["v_proj"](torch.relu(block["q_proj"](x)))

            x = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False) if self.checkpointing else run(x)
        return x


def test_checkpointed_dropout_compiles_and_recomputes_the_masks():
    """Under torch.compile too, a block recomputed by activation checkpointing draws the
    masks of its first pass (the count of forwards is the model's, not the block's)."""
    config = LoRIConfig(r=8, block=(16, 8), target_modules=["q_proj", "v_proj"], dropout=0.3)
    x = torch.randn(4, 32)

    def steps(model):
        randomize_b(model)
        out = []
        for _ in range(3):
            for layer in lori.lori_layers(model).values():
                layer.b_values.grad = None
            y = model(x)
            y.square().sum().backward()
            out.append((y.detach(), [layer.b_values.grad.clone() for layer in lori.lori_layers(model).values()]))
        return out

    want = steps(lori.get_lori_model(Blocks(checkpointing=False), config).train())
    torch.testing.assert_close(steps(lori.get_lori_model(Blocks(checkpointing=True), config).train()), want)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        model = lori.get_lori_model(Blocks(checkpointing=True), config).train()
        got = steps(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["reference", "cpu_ext"])
@pytest.mark.parametrize("stored_a", [False, True])
def test_autocast_runs_the_layer_in_the_autocast_dtype(backend, stored_a):
    """Under torch.autocast (a Trainer's bf16=True) the layer computes as F.linear does, in
    the autocast dtype: exactly the layer on bfloat16 copies of its inputs; the gradient
    reaches the float32 b_values in float32."""
    if backend not in lori_kernels.available_backends():
        pytest.skip(f"{backend} is not available here")
    torch.manual_seed(0)
    a = lori_kernels.generate_a(3, 8, 48) if stored_a else None
    layer = LoRILinear(torch.nn.Linear(48, 40), r=8, alpha=16, seed=3, block=(16, 8), backend=backend, a=a)
    with torch.no_grad():
        layer.b_values.normal_()
    x = torch.randn(5, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.b_values.grad.dtype == torch.float32
    b_values = layer.b_values.detach().bfloat16().requires_grad_()
    expected = lori_kernels.lori_linear(
        x.bfloat16(),
        layer.base_layer.weight.bfloat16(),
        layer.base_layer.bias.bfloat16(),
        None if stored_a else layer.layer_seed,
        b_values,
        layer.b_blocks,
        r=8,
        block=(16, 8),
        scaling=layer.scaling,
        backend=backend,
        a=a.bfloat16() if stored_a else None,
    )
    expected.float().square().sum().backward()
    assert torch.equal(y, expected)
    assert torch.equal(layer.b_values.grad, b_values.grad.float())
