"""A toy world for the demo and the tests, made here and never downloaded: a
character-level tokenizer with a chat template, string tasks (a Caesar shift of a word;
shift 0 is copying; and the named tasks of ``TASKS``, told apart by an instruction in the
prompt), and a tiny Llama pretrained on copying to serve as a base model.
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

__all__ = ["TASKS", "build_base_model", "build_tokenizer", "caesar_examples", "task_examples", "write_jsonl"]

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Q:{{ m['content'] }}\n"
    "{% else %}A:{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


def _shift(word: str, shift: int) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + shift) % 26] for c in word)


def _words(n: int, seed: int, min_len: int, max_len: int) -> list[str]:
    """``n`` random words of ``min_len`` to ``max_len`` lowercase letters."""
    rand = random.Random(seed)
    return ["".join(rand.choice(LETTERS) for _ in range(rand.randint(min_len, max_len))) for _ in range(n)]


def caesar_examples(n: int, shift: int, seed: int, min_len: int = 3, max_len: int = 6) -> list[dict]:
    """``n`` examples ``{"prompt": word, "response": word shifted by shift letters}``."""
    return [{"prompt": word, "response": _shift(word, shift)} for word in _words(n, seed, min_len, max_len)]


# Tasks on a word of lowercase letters, all within the tokenizer's vocabulary, each a
# different use of the copying the base model knows: its answer changes every letter
# (shift, atbash), their order (reverse) or the length (double).
TASKS = {
    "shift": lambda word: _shift(word, 1),  # every letter to the next one: abc -> bcd
    "reverse": lambda word: word[::-1],  # abc -> cba
    "atbash": lambda word: "".join(LETTERS[25 - LETTERS.index(c)] for c in word),  # a<->z, b<->y: abc -> zyx
    "double": lambda word: "".join(c + c for c in word),  # abc -> aabbcc
}


def task_examples(task: str, n: int, seed: int, min_len: int = 3, max_len: int = 6) -> list[dict]:
    """``n`` examples of ``TASKS[task]`` on random words, the task named in the prompt so
    that one model can hold several tasks: ``{"prompt": "reverse:abc", "response": "cba"}``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    return [{"prompt": f"{task}:{word}", "response": TASKS[task](word)} for word in _words(n, seed, min_len, max_len)]


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
