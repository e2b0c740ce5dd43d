"""Interference: the LoRI paper's claims in miniature, on tasks of the toy world.

The paper (arXiv 2504.07448) claims that LoRI adapters of different tasks interfere less
than LoRA's: merged into one model, each keeps more of its single-task accuracy; trained
one after the other (continual learning, the second task under its own mask), the first
task is kept. This suite measures both, with every seed fixed, on ``lori.toy``'s world:

  base model   the toy's tiny Llama (2 layers, hidden 64), pretrained on copying words
  tasks        ``lori.toy.TASKS``, the prompt naming the task so that one model can hold
               all four: shift ("shift:abc" -> "bcd"), reverse ("cba"), atbash ("zyx"),
               double ("aabbcc"); 2048 training and 100 held-out examples each

Methods, all rank 16, alpha 32, on q/k/v/o/gate/up/down, every one trained with the
original LoRI code's recipe (``lori.recipes`` "paper": AdamW, constant learning rate, each
tensor's gradient clipped to norm 1 after masking, each sequence's summed response loss
averaged over the batch), 300 steps of 16 examples, the same batches for every method on a
task:

  lora            PEFT LoRA (``peft.get_peft_model``), A and B trained, lr 3e-3, by the
                  small loop here (the step above, in plain torch)
  lori_d          LoRI-D by ``lori.train``: A frozen and regenerated from a seed (one seed
                  per task, as the original code's unseeded runs draw a new A), B dense,
                  lr 3e-3 (LoRA's, as in the original scripts)
  lori_s          LoRI-S by ``lori.train``: B from zero under element masks (block 1 x 1)
                  keeping 10% of B by the task's LoRI-D |B| (the original's rule), lr 3e-2
                  (ten times LoRI-D's, the paper's ratio)
  lori_s_blocks   the same with the library's default block (32, min(r, 32)) = (32, 16)

Settings, each scored on each task's held-out set by exact match of greedy answers and by
the response loss (mean cross-entropy per response token, in nats: it still tells settings
apart where no answer is exact):

  single        each task's own adapter
  scaled        each task's own adapter alone at its merge weight below (what merging
                would keep if the other adapters did not interfere)
  merge_linear  the four task adapters merged, PEFT's ``linear`` combination (A and B each
                summed with weights √(w·s)); PEFT's ``add_weighted_adapter`` for LoRA,
                ``lori.merge`` for LoRI; w = the original merging scripts' weights for four
                adapters: 0.4 for LoRA and LoRI-D, 0.3 for LoRI-S
  merge_cat     the same, ``cat`` (ΔW = Σ w·s·B·A exactly)
  continual     shift, then double trained on top of it, scored on both: LoRA keeps
                training shift's adapter (A and B), LoRI-D shift's B (all of it), LoRI-S
                trains shift's LoRI-S adapter under double's mask (extracted from double's
                LoRI-D), every other entry of B kept bit for bit (``lori.continual``), as the
                original code's continual scripts do

The full suite takes 2 to 4 minutes on a shared 2-core VM; ``quick`` is a smoke run of
seconds (a base model of 30 steps, 4 training steps: its numbers mean nothing). On the CPU
the models run on one thread: these tiny operations gain nothing from a second one, and on
a machine shared with other work two threads were measured about 10x slower than one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

import lori
from lori import toy
from lori.config import DEFAULT_TARGET_MODULES
from lori.data import IGNORE_INDEX, collate, load_examples, tokenize_example, tokenize_prompt
from lori.merge import ORIGINAL_WEIGHTS
from lori.train import TrainConfig, train
from lori.train.loss import response_loss_sum

from .common import environment

log = logging.getLogger(__name__)

__all__ = ["METHODS", "SETTINGS", "TASKS", "exact_match", "response_loss", "run"]

TASKS = ("shift", "reverse", "atbash", "double")
CONTINUAL = ("shift", "double")  # the first task, then the second on top of it
SETTINGS = ("single", "scaled", "merge_linear", "merge_cat", "continual")
RANK, ALPHA, SPARSITY = 16, 32.0, 0.9
LR = 3e-3  # LoRA and LoRI-D; LoRI-S trains at ten times it
MAX_LENGTH = 512  # TrainConfig's: no example is cut


@dataclasses.dataclass(frozen=True)
class Method:
    """An adapter kind: ``lora`` (PEFT) or ``lori``; ``block``: the masks' block for LoRI-S
    (``None``: B dense)."""

    name: str
    label: str
    kind: str
    block: tuple[int, int] | None = None

    @property
    def lr(self) -> float:
        return LR if self.block is None else 10 * LR

    @property
    def block_name(self) -> str:
        return "-" if self.block is None else f"{self.block[0]}x{self.block[1]}"


METHODS = (
    Method("lora", "PEFT LoRA", "lora"),
    Method("lori_d", "LoRI-D", "lori"),
    Method("lori_s", "LoRI-S, element masks", "lori", (1, 1)),
    Method("lori_s_blocks", "LoRI-S, default blocks", "lori", (32, min(RANK, 32))),
)


@dataclasses.dataclass(frozen=True)
class Size:
    """How much the suite trains and scores."""

    base_steps: int  # the base model's pretraining on copying
    train_examples: int
    test_examples: int
    steps: int  # optimizer steps of every adapter
    batch_size: int


FULL = Size(base_steps=300, train_examples=2048, test_examples=100, steps=300, batch_size=16)
QUICK = Size(base_steps=30, train_examples=64, test_examples=8, steps=4, batch_size=8)


class World:
    """The toy world under ``root``: tokenizer, base model (kept in memory, copies handed
    out), each task's training file and held-out examples. Task ``i`` draws its words from
    seeds ``100 + i`` (training) and ``200 + i`` (held out); its adapters' seed, and the seed
    of its batch order, is ``1 + i``."""

    def __init__(self, root: Path, size: Size):
        self.root, self.size = root, size
        self.tokenizer = toy.build_tokenizer(root / "tokenizer")
        self.base_path = root / "base"
        self._base = toy.build_base_model(self.base_path, self.tokenizer, steps=size.base_steps, progress=False)
        self.tests = {}
        for i, task in enumerate(TASKS):
            toy.write_jsonl(toy.task_examples(task, size.train_examples, seed=100 + i), self.data(task))
            self.tests[task] = toy.task_examples(task, size.test_examples, seed=200 + i)

    def data(self, task: str) -> Path:
        return self.root / "data" / f"{task}.jsonl"

    def seed(self, task: str) -> int:
        return 1 + TASKS.index(task)

    def base_model(self) -> nn.Module:
        return copy.deepcopy(self._base)

    def batches(self, task: str) -> Iterator[dict[str, torch.Tensor]]:
        """The batches ``lori.train`` draws for ``task`` (one process, no accumulation): each
        epoch a permutation of the examples seeded by the task's seed plus the epoch."""
        examples = [tokenize_example(self.tokenizer, e, MAX_LENGTH) for e in load_examples(self.data(task))]
        size = self.size.batch_size
        per_epoch = len(examples) // size
        for step in range(self.size.steps):
            epoch, index = divmod(step, per_epoch)
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.seed(task) + epoch))
            chosen = order[index * size : (index + 1) * size].tolist()
            yield collate([examples[i] for i in chosen], self.tokenizer.pad_token_id)


def train_adapter(
    world: World, method: Method, task: str, output: Path, *, init: Path | None = None, masks: Path | None = None
) -> Path:
    """Train ``method``'s adapter on ``task`` into ``output`` and return the adapter's
    directory; with ``init``, continue that adapter (continual learning: LoRI trains only
    ``masks``' entries of it, or all of B without masks). Every kind takes the same step
    (the paper recipe) on the same batches: LoRI by ``lori.train``, LoRA by ``_train_lora``."""
    if method.kind == "lora":
        return _train_lora(world, task, output, init)
    config = TrainConfig.from_recipe(
        "paper",
        adapter=dict(r=RANK, alpha=ALPHA, seed=world.seed(task), block=method.block or (1, 1)),
        model=str(world.base_path),
        data=str(world.data(task)),
        output=str(output),
        init_adapter=None if init is None else str(init),
        masks=None if masks is None else str(masks),
        lr=method.lr,
        max_steps=world.size.steps,
        batch_size=world.size.batch_size,
        max_length=MAX_LENGTH,
        data_seed=world.seed(task),
        precision="fp32",
        progress=False,
        log_every=world.size.steps,
    )
    return Path(train(config)["adapter"])


def _train_lora(world: World, task: str, output: Path, init: Path | None) -> Path:
    """PEFT LoRA on ``task`` (or continuing the adapter at ``init``, A and B), with the
    paper recipe's step: the batch's summed response loss over its sequences, each
    tensor's gradient clipped to norm 1, AdamW at a constant ``LR``."""
    import peft

    torch.manual_seed(world.seed(task))  # LoRA's A is drawn at random
    if init is None:
        config = peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(DEFAULT_TARGET_MODULES)
        )
        model = peft.get_peft_model(world.base_model(), config)
    else:
        model = peft.PeftModel.from_pretrained(world.base_model(), str(init), is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    for batch in world.batches(task):
        loss = response_loss_sum(model, batch) / batch["input_ids"].shape[0]
        loss.backward()
        for p in params:
            torch.nn.utils.clip_grad_norm_([p], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    log.info("LoRA on %s: loss %.4f after %d steps", task, loss.item(), world.size.steps)
    model.save_pretrained(str(output))
    return output


def load_adapter(world: World, method: Method, path: Path) -> nn.Module:
    """The base model with the adapter at ``path``."""
    if method.kind == "lora":
        import peft

        return peft.PeftModel.from_pretrained(world.base_model(), str(path))
    return lori.load_lori(world.base_model(), path)


def merge_weight(method: Method, n: int) -> float:
    """The original LoRI merging scripts' weight of each of ``n`` adapters: LoRI-S's for
    masked adapters, LoRI-D's for dense ones (LoRA's too)."""
    dense, sparse = ORIGINAL_WEIGHTS[3 if n <= 3 else 4]
    return dense if method.block is None else sparse


def merged_model(world: World, method: Method, paths: list[Path], combination: str, weight: float) -> nn.Module:
    """The base model with the adapters at ``paths`` merged, each with ``weight``
    (``combination`` ``linear`` or ``cat``): PEFT's ``add_weighted_adapter`` for LoRA,
    ``lori.merge`` for LoRI."""
    weights = [weight] * len(paths)
    if method.kind == "lora":
        import peft

        model = peft.PeftModel.from_pretrained(world.base_model(), str(paths[0]), adapter_name="task0")
        for i, path in enumerate(paths[1:], 1):
            model.load_adapter(str(path), adapter_name=f"task{i}")
        names = [f"task{i}" for i in range(len(paths))]
        model.add_weighted_adapter(names, weights, "merged", combination_type=combination)
        model.set_adapter("merged")
        return model
    return lori.merge(world.base_model(), paths, weights=weights, combination=combination)


def adapter_parameters(model: nn.Module) -> int:
    """Trained values of the model's adapter: LoRA's A and B, LoRI's kept entries of B."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name or name.endswith("b_values"))


@contextlib.contextmanager
def _scoring(model: nn.Module):
    """``model`` in eval mode without gradients, its mode restored after; yields its device."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def response_loss(model: nn.Module, tokenizer, examples: list[dict]) -> float:
    """Mean cross-entropy per response token of ``examples`` (nats), in one batch."""
    batch = collate([tokenize_example(tokenizer, e, MAX_LENGTH) for e in examples], tokenizer.pad_token_id)
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with _scoring(model) as device:
        return float(response_loss_sum(model, {k: v.to(device) for k, v in batch.items()})) / max(tokens, 1)


def exact_match(model: nn.Module, tokenizer, examples: list[dict]) -> float:
    """Fraction of ``examples`` whose greedy answer is exactly the response: what
    ``lori.evaluate.evaluate`` counts (at most ``len(response) + 2`` new tokens, up to
    EOS), decoded for all prompts of one length at once."""
    by_length: dict[int, list[tuple[list[int], str]]] = {}
    for e in examples:
        ids = tokenize_prompt(tokenizer, e["prompt"])
        by_length.setdefault(len(ids), []).append((ids, e["response"]))
    eos, correct = tokenizer.eos_token_id, 0
    with _scoring(model) as device:
        for group in by_length.values():
            ids = torch.tensor([i for i, _ in group], device=device)
            start = ids.shape[1]
            for _ in range(max(len(r) for _, r in group) + 2):
                token = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, token], dim=1)
                if bool((ids[:, start:] == eos).any(dim=1).all()):
                    break
            for row, (_, response) in zip(ids[:, start:].tolist(), group, strict=True):
                row = row[: len(response) + 2]
                row = row[: row.index(eos)] if eos in row else row
                correct += tokenizer.decode(row, skip_special_tokens=True) == response
    return correct / max(len(examples), 1)


def run(device: torch.device, *, quick: bool = False, full: bool = False, backends: list[str] | None = None) -> dict:
    """The interference suite: table ``interference``, one row per method, setting and task
    (``device`` is where adapters are scored and LoRA trains; ``lori.train`` picks its own)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return {"interference": _run(Path(tmp), device, QUICK if quick else FULL)}
    finally:
        torch.set_num_threads(threads)


def _run(root: Path, device: torch.device, size: Size) -> list[dict]:
    began = time.perf_counter()
    world = World(root, size)
    log.info("interference: toy world built (%.0f s)", time.perf_counter() - began)
    rows = []

    def score(model: nn.Module, method: Method | None, setting: str, tasks, **extra) -> None:
        model.to(device)
        for task in tasks:
            em = exact_match(model, world.tokenizer, world.tests[task])
            loss = response_loss(model, world.tokenizer, world.tests[task])
            rows.append(
                {
                    "method": "base" if method is None else method.name,
                    "label": "base model" if method is None else method.label,
                    "block": "-" if method is None else method.block_name,
                    "setting": setting,
                    "task": task,
                    "exact_match": round(em, 4),
                    "loss": round(loss, 4),
                    "trained_values": 0 if method is None else adapter_parameters(model),
                    **extra,
                }
            )
            log.info(
                "interference: %s, %s, %s: exact match %.2f, loss %.3f", rows[-1]["label"], setting, task, em, loss
            )

    score(world.base_model(), None, "single", TASKS)
    adapters: dict[tuple[str, str], Path] = {}  # (method, task) -> adapter
    masks: dict[tuple[str, tuple[int, int]], Path] = {}  # (task, block) -> its LoRI-D's masks
    for task in TASKS:
        for method in METHODS:  # LoRI-D before LoRI-S: the masks come from it
            tick = time.perf_counter()
            output = root / "runs" / method.name / task
            path = train_adapter(world, method, task, output, masks=masks.get((task, method.block)))
            adapters[(method.name, task)] = path
            model = load_adapter(world, method, path)
            if method.name == "lori_d":
                for block in {m.block for m in METHODS if m.block is not None}:
                    masks[(task, block)] = root / "masks" / f"{task}_{block[0]}x{block[1]}.safetensors"
                    extracted = lori.extract_masks(model, SPARSITY, block=block, rule="original")
                    lori.save_masks(extracted, masks[(task, block)])
            score(model, method, "single", [task], train_seconds=round(time.perf_counter() - tick, 1))

    for method in METHODS:
        weight = merge_weight(method, len(TASKS))
        for task in TASKS:
            model = merged_model(world, method, [adapters[(method.name, task)]], "cat", weight)
            score(model, method, "scaled", [task], merge_weight=weight)
        for combination in ("linear", "cat"):
            paths = [adapters[(method.name, task)] for task in TASKS]
            model = merged_model(world, method, paths, combination, weight)
            score(model, method, f"merge_{combination}", TASKS, merge_weight=weight)

    first, second = CONTINUAL
    for method in METHODS:
        tick = time.perf_counter()
        init = adapters[(method.name, first)]
        output = root / "continual" / method.name
        path = train_adapter(world, method, second, output, init=init, masks=masks.get((second, method.block)))
        model = load_adapter(world, method, path)
        score(model, method, "continual", CONTINUAL, train_seconds=round(time.perf_counter() - tick, 1))

    seconds = round(time.perf_counter() - began, 1)
    log.info("interference: %d rows in %.0f s", len(rows), seconds)
    env = environment(device)
    settings = dict(
        r=RANK,
        alpha=ALPHA,
        sparsity=SPARSITY,
        steps=size.steps,
        batch_size=size.batch_size,
        lr=LR,
        train_examples=size.train_examples,
        test_examples=size.test_examples,
        threads=torch.get_num_threads(),
        suite_seconds=seconds,
    )
    columns = ("method", "label", "block", "setting", "task", "exact_match", "loss", "trained_values")
    extras = ("merge_weight", "train_seconds")
    return [{**env, **{k: row[k] for k in columns}, **{k: row.get(k, "") for k in extras}, **settings} for row in rows]
