"""The run: LoRI-D, LoRI-S or continual learning, alone or under FSDP2, with the loss of a
step normalised over the global batch (by its response tokens or its sequences),
checkpoints, resume, and a stop at the first non-finite loss or gradient norm."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lori.checkpoint import save_lori
from lori.continual import FrozenBlocks, stack_adapter
from lori.data import IGNORE_INDEX, collate, load_examples, tokenize_example
from lori.errors import TrainingError
from lori.masks import load_masks
from lori.model import enable_activation_checkpointing, get_lori_model, print_trainable_parameters
from lori.quantize import quantize_base
from lori.train.checkpoint import ADAPTER_DIR, check_output, load_checkpoint, remove_checkpoint, save_checkpoint
from lori.train.config import TrainConfig
from lori.train.loss import response_loss_sum
from lori.train.world import World, build_on_meta, device_mesh, load_model, shard

log = logging.getLogger(__name__)

__all__ = ["train"]


def _lr_lambda(total_steps: int, warmup_steps: int, schedule: str):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is taken on (labels are predicted one position ahead)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _loss_denominator(batches: list[dict[str, torch.Tensor]], world: World, cfg: TrainConfig, step: int) -> int:
    """What a step's summed loss is divided by: the response tokens of its global batch
    (``loss_normalization="token"``) or its sequences (``"sequence"``), over all processes."""
    tokens = world.all_sum(sum(_response_tokens(b) for b in batches))
    if tokens == 0:
        raise ValueError(
            f"step {step + 1} has no response tokens: is max_length ({cfg.max_length}) shorter than the prompts?"
        )
    if cfg.loss_normalization == "token":
        return tokens
    return world.all_sum(sum(b["labels"].shape[0] for b in batches))


def _clip(params: list[torch.Tensor], max_norm: float | None, mode: str) -> float:
    """Clip the gradients (one global norm, or each tensor's; ``None``: no clipping) and
    return their global norm before clipping (a collective under FSDP)."""
    groups = [params] if mode == "global" or max_norm is None else [[p] for p in params]
    norms = [torch.nn.utils.clip_grad_norm_(group, math.inf if max_norm is None else max_norm) for group in groups]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    return math.sqrt(sum(float(n) ** 2 for n in norms))


def train(cfg: TrainConfig) -> dict:
    """Run ``cfg``; return ``{"losses": [loss per step], "adapter": path, "steps": n}``.
    Under torchrun every process calls it."""
    world = World()
    try:
        return _train(cfg, world)
    finally:
        world.close()


def _adapt(model: torch.nn.Module, cfg: TrainConfig, masks, device=None) -> FrozenBlocks | None:
    """Give ``model`` its adapter (new, or stacked on ``init_adapter``: then the keeper of
    its frozen blocks is returned) on ``device`` (default: the base weights')."""
    if cfg.init_adapter:
        return stack_adapter(
            model, cfg.init_adapter, masks, dropout=cfg.adapter.dropout, backend=cfg.backend, device=device
        )
    get_lori_model(model, cfg.adapter, masks=masks, backend=cfg.backend, device=device)
    return None


def _load_sharded(cfg: TrainConfig, world: World, dtype: torch.dtype, masks, bf16: bool):
    """The model sharded by FSDP2 over ``world``, with only rank 0 reading the weights:
    every rank builds the model on ``meta`` (its adapter, which is small, on the CPU) and
    shards it; then the weights rank 0 read reach every rank's shard by broadcast
    (``set_model_state_dict(..., broadcast_from_rank0=True)``). No other rank holds more
    than its shard and one tensor in flight. Returns the model and its frozen blocks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full, buffers = {}, {}
    if world.main:
        source = load_model(cfg.model, dtype)
        _adapt(source, cfg, masks)
        full = source.state_dict()
        buffers = {name: b for name, b in source.named_buffers() if name not in full}
        del source
    model = build_on_meta(cfg.model, dtype)
    frozen = _adapt(model, cfg, masks, device="cpu")
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    shard(model, device_mesh(world, cfg.mesh), bf16)
    if frozen is not None:
        frozen.shard_like_parameters()
    model.to_empty(device=world.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    persistent = model.state_dict().keys()
    for name, buffer in model.named_buffers():  # not in a state dict (e.g. rotary frequencies): broadcast too
        if name in persistent:
            continue
        if world.main:
            buffer.copy_(buffers[name])
        torch.distributed.broadcast(buffer, src=0)
    return model, frozen


def _check_inputs(cfg: TrainConfig) -> None:
    """The paths a run reads exist (checked before anything is loaded)."""
    if not (Path(cfg.model) / "config.json").is_file():
        raise FileNotFoundError(f"no model directory at {cfg.model} (a local Hugging Face model with config.json)")
    for name in ("data", "masks"):
        if getattr(cfg, name) and not Path(getattr(cfg, name)).is_file():
            raise FileNotFoundError(f"no {name} file at {getattr(cfg, name)}")
    if cfg.init_adapter and not Path(cfg.init_adapter).is_dir():
        raise FileNotFoundError(f"no adapter directory at {cfg.init_adapter}")


def _train(cfg: TrainConfig, world: World) -> dict:
    from transformers import AutoTokenizer

    output = Path(cfg.output)
    _check_inputs(cfg)
    cfg.check_world_size(world.size)
    found = check_output(cfg, output)
    if cfg.overwrite_output and world.main:
        for old in found:
            remove_checkpoint(old)
    world.barrier()
    found = found if cfg.resume else []
    torch.manual_seed(cfg.adapter.seed)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and world.device.type == "cuda")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dtype = torch.bfloat16 if bf16 else torch.float32
    masks = load_masks(cfg.masks) if cfg.masks else None
    if world.size == 1:
        model = load_model(cfg.model, dtype).to(world.device)
        if cfg.quantize_base is not None:
            quantize_base(model, cfg.quantize_base)
        frozen = _adapt(model, cfg, masks)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
    else:
        model, frozen = _load_sharded(cfg, world, dtype, masks, bf16)
    if world.main:
        print_trainable_parameters(model)
        log.info("base weights in %s, adapter in float32", str(dtype).removeprefix("torch."))
    model.train()

    examples = [tokenize_example(tokenizer, e, cfg.max_length) for e in load_examples(cfg.data)]
    per_step = cfg.batch_size * world.size * cfg.grad_accum
    steps_per_epoch = len(examples) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} examples are fewer than one optimizer step's {per_step}")
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    params = [p for p in model.parameters() if p.requires_grad]
    if sum(p.numel() for p in params) == 0:
        raise ValueError("nothing to train: the adapter keeps no block of B (are the masks empty?)")
    optimizer = torch.optim.AdamW(params, lr=cfg.peak_lr(), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total, round(cfg.warmup_ratio * total), cfg.schedule)
    )

    start, losses, last_checkpoint = 0, [], None
    if found:
        state = load_checkpoint(model, optimizer, scheduler, cfg, world, found[-1])
        start, losses, last_checkpoint = state["step"], state["losses"], found[-1]
    elif cfg.resume and world.main:
        log.info("no checkpoint in %s: starting from step 0", output)

    def micro_batches(step: int):
        epoch, index = divmod(step, steps_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.data_seed + epoch))
        chosen = order[index * per_step : (index + 1) * per_step].tolist()
        for a in range(cfg.grad_accum):
            first = (a * world.size + world.rank) * cfg.batch_size
            yield collate([examples[i] for i in chosen[first : first + cfg.batch_size]], pad_id)

    bar = tqdm(range(start, total), initial=start, total=total, desc="train", disable=not (cfg.progress and world.main))
    for step in bar:
        batches = [{k: v.to(world.device) for k, v in b.items()} for b in micro_batches(step)]
        denominator = _loss_denominator(batches, world, cfg, step)
        step_loss = 0.0
        for a, batch in enumerate(batches):
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(a == len(batches) - 1)
            loss_sum = response_loss_sum(model, batch, cfg.loss_chunk_tokens)
            (loss_sum * (world.size / denominator)).backward()
            step_loss += loss_sum.item()
        if frozen is not None:
            frozen.mask_grads()
        loss = world.all_sum(step_loss) / denominator
        grad_norm = _clip(params, cfg.clip_grad, cfg.clip_mode)
        done = step + 1
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TrainingError(
                f"step {done}: loss {loss:g}, gradient norm {grad_norm:g}: training diverged (a lower --lr?); "
                f"stopped before the update, nothing saved; the last good checkpoint is {last_checkpoint or 'none'}"
            )
        optimizer.step()
        if frozen is not None:
            frozen.restore()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if world.main and (done % cfg.log_every == 0 or done == total):
            log.info(
                "step %d/%d loss %.4f grad norm %.3g lr %.3g", done, total, loss, grad_norm, scheduler.get_last_lr()[0]
            )
        if cfg.save_every and done % cfg.save_every == 0 and done < total:
            last_checkpoint = output / "checkpoints" / f"step-{done:07d}"
            save_checkpoint(
                model,
                optimizer,
                scheduler,
                cfg,
                world,
                done,
                done * cfg.grad_accum,
                losses,
                last_checkpoint,
            )
    adapter = save_lori(model, output / ADAPTER_DIR)
    world.barrier()
    return {"losses": losses, "adapter": str(adapter), "steps": total}
