"""``--recipe paper`` reproduces the original LoRI code (github juzhengz/LoRI): its update
rule re-derived here in plain torch from the code's description, and its mask rule."""

import pytest
import torch

import lori
from lori import LoRIConfig, toy
from lori.cli import main
from lori.data import IGNORE_INDEX, collate, load_examples, tokenize_example
from lori.masks import extract_masks
from lori.train import TrainConfig, train
from lori_kernels import generate_a, rng

R, SEED, LR, STEPS, BATCH = 8, 5, 1e-2, 3, 4
SCALING = 2.0  # alpha = 2r


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    tokenizer = toy.build_tokenizer(root / "tokenizer")
    toy.build_base_model(root / "base", tokenizer, steps=20, progress=False)
    toy.write_jsonl(toy.caesar_examples(32, 1, 10), root / "train.jsonl")
    return root


def base(world):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(world / "base"))


def element_masks(world, keep=0.1):
    """Random element masks ([out, r]) of every adapted layer of the toy model."""
    model = lori.get_lori_model(base(world), LoRIConfig(r=R, block=(1, 1)))
    g = torch.Generator().manual_seed(0)
    return {
        name: torch.rand(layer.out_features, R, generator=g) < keep for name, layer in lori.lori_layers(model).items()
    }


def original_lori_s(world, masks):
    """The original code's LoRI-S in plain torch: PEFT-style LoRA (A frozen, B dense from
    zero), loss = mean over the batch's sequences of each one's summed response-token
    negative log-likelihood (``_get_batch_logps``), then per parameter in backward: B's
    gradient masked, clipped to norm 1, one AdamW step (weight decay 0) at a constant
    learning rate. Same batches as ``lori.train`` (its data order)."""
    from transformers import AutoTokenizer

    model = base(world)
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(str(world / "base"))
    linears = dict(model.named_modules())
    b, optimizers = {}, {}
    for name in masks:
        linear = linears[name]
        a = generate_a(rng.layer_seed(SEED, name), R, linear.in_features)
        b[name] = torch.zeros(linear.out_features, R, requires_grad=True)
        optimizers[name] = torch.optim.AdamW([b[name]], lr=LR, weight_decay=0.0)

        def hook(module, inputs, output, a=a, bn=b[name]):
            return output + SCALING * (inputs[0] @ a.t()) @ bn.t()

        linear.register_forward_hook(hook)
    model.requires_grad_(False)
    examples = [tokenize_example(tokenizer, e, 512) for e in load_examples(world / "train.jsonl")]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))
    for step in range(STEPS):
        batch = collate(
            [examples[i] for i in order[step * BATCH : (step + 1) * BATCH].tolist()], tokenizer.pad_token_id
        )
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:].clone()
        keep = labels != IGNORE_INDEX
        labels[~keep] = 0
        logps = torch.gather(logits[:, :-1].log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
        loss = -(logps * keep).sum(-1).mean()
        loss.backward()
        with torch.no_grad():
            for name, p in b.items():
                p.grad[~masks[name]] = 0
                torch.nn.utils.clip_grad_norm_(p, 1.0)
                optimizers[name].step()
                p.grad = None
    return {name: p.detach() for name, p in b.items()}


def test_paper_recipe_lori_s_follows_the_original_update_rule(world, tmp_path):
    """Three LoRI-S steps of ``TrainConfig.from_recipe("paper")`` and of the original rule:
    the same B to float32 noise (<= 1e-4 relative)."""
    masks = element_masks(world)
    lori.save_masks(masks, tmp_path / "masks.safetensors")
    cfg = TrainConfig.from_recipe(
        "paper",
        model=str(world / "base"),
        data=str(world / "train.jsonl"),
        output=str(tmp_path / "run"),
        adapter=dict(r=R, seed=SEED),
        masks=str(tmp_path / "masks.safetensors"),
        lr=LR,
        batch_size=BATCH,
        max_steps=STEPS,
        progress=False,
    )
    assert cfg.adapter.block == (1, 1) and (cfg.schedule, cfg.warmup_ratio) == ("constant", 0.0)
    assert (cfg.clip_mode, cfg.clip_grad, cfg.loss_normalization) == ("per_tensor", 1.0, "sequence")
    ours = lori.lori_layers(lori.load_lori(base(world), train(cfg)["adapter"]))
    theirs = original_lori_s(world, masks)
    scale = max(float(t.abs().max()) for t in theirs.values())
    assert scale > 1e-3  # B moved
    for name, b in theirs.items():
        assert torch.equal(ours[name].mask(), masks[name])
        torch.testing.assert_close(ours[name].b_dense(), b, rtol=0, atol=1e-4 * scale)


def test_the_cli_recipe_sets_defaults_under_the_options_given(world, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("lori.train.train", lambda cfg: seen.setdefault("cfg", cfg) and {"losses": [0.0], "steps": 0,
                                                                                            "adapter": ""})  # fmt: skip
    args = ["train", "--model", "m", "--data", "d", "--output", "o", "--recipe", "paper", "--schedule", "cosine"]
    assert main([*args, "--rank", "16"]) == 0
    cfg = seen["cfg"]
    assert cfg.schedule == "cosine" and cfg.clip_mode == "per_tensor" and cfg.loss_normalization == "sequence"
    assert cfg.adapter.r == 16 and cfg.adapter.block == (1, 1)
    seen.clear()
    assert main(["train", "--model", "m", "--data", "d", "--output", "o"]) == 0
    assert seen["cfg"] == TrainConfig(model="m", data="d", output="o")  # the library's defaults


def test_sequence_loss_normalization_weighs_each_sequence_once(world, tmp_path):
    """One step, one example: the sequence-normalised loss is the token loss times the
    sequence's response tokens."""
    common = dict(model=str(world / "base"), data=str(world / "train.jsonl"), adapter=LoRIConfig(r=R), batch_size=1,
                  max_steps=1, progress=False)  # fmt: skip
    token = train(TrainConfig(output=str(tmp_path / "t"), **common))["losses"][0]
    sequence = train(TrainConfig(output=str(tmp_path / "s"), loss_normalization="sequence", **common))["losses"][0]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(world / "base"))
    first = torch.randperm(32, generator=torch.Generator().manual_seed(0))[0]
    example = tokenize_example(tokenizer, load_examples(world / "train.jsonl")[first], 512)
    n = sum(label != IGNORE_INDEX for label in example["labels"][1:])
    assert sequence == pytest.approx(token * n, rel=1e-5)


def test_original_mask_rule_keeps_every_tie_of_the_last_kept(world):
    """extract_mask.py: k = int((1 - s) * N), threshold the k-th largest |B|, keep |B| >=
    threshold: all ties of the threshold. The exact rule keeps round((1 - s) * N)."""
    model = lori.get_lori_model(base(world), LoRIConfig(r=R, block=(1, 1)))
    values = torch.cat([layer.b_values.detach().flatten() for layer in lori.lori_layers(model).values()])
    n = values.numel()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lori.lori_layers(model).values():
            layer.b_values.copy_(torch.randint(-50, 51, layer.b_values.shape, generator=g).float())  # many ties
    flat = torch.cat([layer.b_dense().abs().flatten() for layer in lori.lori_layers(model).values()])
    k = int(0.1 * n)
    want = int((flat >= torch.topk(flat, k).values[-1]).sum())
    original = extract_masks(model, 0.9, rule="original")
    assert sum(int(m.sum()) for m in original.values()) == want > k
    exact = extract_masks(model, 0.9)
    assert sum(int(m.sum()) for m in exact.values()) == round(0.1 * n)
    with pytest.raises(ValueError, match="rule must be one of"):
        extract_masks(model, 0.9, rule="topk")
