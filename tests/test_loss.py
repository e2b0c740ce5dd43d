"""The chunked training loss: the same loss and gradients as the full logits, without
them (peak memory of the logits cut by the chunk's share)."""

import pytest
import torch
from test_model import TINY, randomize_b, tiny_model

import lori
from lori import LoRIConfig
from lori.bench.memory import LiveTensors
from lori.data import IGNORE_INDEX
from lori.train.loss import response_loss_sum


def batch(vocab, seed=0, rows=3, length=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # the prompt
    labels[0, 8:] = IGNORE_INDEX  # padding
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, b, chunk):
    loss = response_loss_sum(model, b, chunk)
    loss.backward()
    grads = {n: layer.b_values.grad.clone() for n, layer in lori.lori_layers(model).items()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("chunk", [1, 4, 7, 1024])
def test_chunked_loss_equals_the_full_logits(chunk):
    model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 8)), backend="reference")
    randomize_b(model)
    b = batch(TINY["vocab_size"])
    full, full_grads = loss_and_grads(model, b, 0)
    chunked, grads = loss_and_grads(model, b, chunk)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=0)
    for name, g in full_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)
    assert "forward" not in vars(model.get_output_embeddings())  # the output layer is itself again


def test_a_model_that_transforms_its_logits_takes_the_full_path(caplog):
    """Soft-capped logits (Gemma 2): the chunked loss would be wrong, so it is not used."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(**{**TINY, "head_dim": 16}, final_logit_softcapping=3.0)
    model = lori.get_lori_model(Gemma2ForCausalLM(config), LoRIConfig(r=8, block=(16, 8)), backend="reference")
    randomize_b(model)
    b = batch(TINY["vocab_size"])
    full = response_loss_sum(model, b, 0)
    assert response_loss_sum(model, b, 4).item() == pytest.approx(full.item(), rel=1e-6)
    assert "transforms its logits" in caplog.text and model.lori_full_logits


def test_chunks_cut_the_logits_peak():
    """Vocabulary 32k, 1024 response tokens: the peak of the live tensors of forward and
    backward falls by more than 4x with 128-token chunks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "vocab_size": 32768, "num_hidden_layers": 1})
    model = lori.get_lori_model(LlamaForCausalLM(config), LoRIConfig(r=8, block=(16, 8)), backend="reference")
    b = batch(32768, rows=1, length=1025)
    b["labels"] = b["input_ids"].clone()
    b["attention_mask"] = torch.ones_like(b["input_ids"])
    peaks = {}
    for chunk in (0, 128):
        with LiveTensors() as tracker:
            response_loss_sum(model, b, chunk).backward()
        peaks[chunk] = tracker.peak
    assert peaks[0] > 4 * peaks[128], peaks
