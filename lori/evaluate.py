"""Held-out evaluation of a causal LM on prompt/response examples: mean token loss on the
responses, and exact-match accuracy of greedy generation."""

from __future__ import annotations

import torch

from lori.data import collate, tokenize_example, tokenize_prompt

__all__ = ["evaluate", "greedy_response"]


@torch.no_grad()
def greedy_response(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding after the prompt until EOS or ``max_new_tokens``."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenize_prompt(tokenizer, prompt)], device=device)
    new = []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=ids).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[dict], *, max_length: int = 64, batch_size: int = 32) -> dict[str, float]:
    """``{"loss": mean response-token loss, "exact_match": fraction of exact greedy answers}``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(
            [tokenize_example(tokenizer, e, max_length) for e in examples[start : start + batch_size]],
            tokenizer.pad_token_id,
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum"
        )
        total_loss += loss.item()
        total_tokens += int((labels != -100).sum())
    correct = sum(
        greedy_response(model, tokenizer, e["prompt"], len(e["response"]) + 2) == e["response"] for e in examples
    )
    model.train(was_training)
    return {"loss": total_loss / max(total_tokens, 1), "exact_match": correct / max(len(examples), 1)}
