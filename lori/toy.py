"""A toy world for the demo and the tests, made here and never downloaded: a
character-level tokenizer with a chat template, string tasks (a Caesar shift of a word;
shift 0 is copying), and a tiny Llama pretrained on copying to serve as a base model.
Everything is written to local directories and read back through the ordinary loaders
(``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained``, ``lori.data.load_examples``).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lori.data import collate, tokenize_example

log = logging.getLogger(__name__)

__all__ = ["build_base_model", "build_tokenizer", "caesar_examples", "write_jsonl"]

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Q:{{ m['content'] }}\n"
    "{% else %}A:{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


def caesar_examples(n: int, shift: int, seed: int, min_len: int = 3, max_len: int = 6) -> list[dict]:
    """``n`` examples ``{"prompt": word, "response": word shifted by shift letters}``."""
    rand = random.Random(seed)
    examples = []
    for _ in range(n):
        word = "".join(rand.choice(LETTERS) for _ in range(rand.randint(min_len, max_len)))
        examples.append({"prompt": word, "response": "".join(LETTERS[(LETTERS.index(c) + shift) % 26] for c in word)})
    return examples


def write_jsonl(examples: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def build_tokenizer(path: str | Path):
    """A character-level fast tokenizer (letters, ``Q``, ``A``, ``:``, newline) with a chat
    template, saved to ``path`` and returned."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(LETTERS + "QA:\n"))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(path))
    return tokenizer


def build_base_model(path: str | Path, tokenizer, *, steps: int = 300, seed: int = 0, progress: bool = True):
    """A tiny Llama (2 layers, hidden 64) trained in full on copying words, saved to
    ``path`` with its tokenizer: a base model that knows the format but not the shift."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    examples = [tokenize_example(tokenizer, e, 32) for e in caesar_examples(4096, 0, seed + 1)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 30))
    model.train()
    bar = tqdm(range(steps), desc="base model (copying)", disable=not progress, leave=False)
    for step in bar:
        batch = collate(examples[(step * 32) % len(examples) :][:32], tokenizer.pad_token_id)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    log.info("base model: copying loss %.4f after %d steps", loss.item(), steps)
    model.eval()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return model
