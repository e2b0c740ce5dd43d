"""Mask extraction (global top-k of block norms) and mask files."""

import pytest
import torch
from test_model import randomize_b, tiny_model

import lori
from lori import LoRIConfig
from lori.errors import CheckpointError
from lori.masks import extract_masks, load_masks, save_masks


def trained_model(block=(16, 8), seed=1):
    model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=block))
    randomize_b(model, seed)
    return model


@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("block", [(1, 1), (16, 8), (32, 4)])
def test_exact_kept_fraction(sparsity, block):
    model = trained_model()
    masks = extract_masks(model, sparsity, block=block)
    assert set(masks) == set(lori.lori_layers(model))
    bo, br = block
    n_blocks = sum(-(-m.shape[0] // bo) * (m.shape[1] // br) for m in masks.values())
    kept_blocks = 0
    for m in masks.values():
        padded = torch.nn.functional.pad(m, (0, 0, 0, -(-m.shape[0] // bo) * bo - m.shape[0]))
        tiles = padded.reshape(-1, bo, m.shape[1] // br, br)
        counts = tiles.sum(dim=(1, 3))
        real = tiles.shape[1] * br
        assert bool(((counts == 0) | (counts >= min(real, (m.shape[0] % bo or bo) * br))).all())
        kept_blocks += int((counts > 0).sum())
    assert kept_blocks == round((1 - sparsity) * n_blocks)


def test_keeps_the_largest_blocks_globally():
    model = trained_model(block=(16, 8))
    layers = list(lori.lori_layers(model).values())
    with torch.no_grad():
        for layer in layers:
            layer.b_values.fill_(0.01)
        layers[3].b_values[1] = 5.0  # the one block that must survive at high sparsity
        layers[0].b_values[0] = 4.0
    masks = extract_masks(model, 1 - 2 / sum(layer.b_values.shape[0] for layer in layers))
    kept = {name: int(m.sum()) for name, m in masks.items() if m.any()}
    assert kept == {list(masks)[0]: 16 * 8, list(masks)[3]: 16 * 8}
    assert masks[list(masks)[3]][16:32].all()


def test_ties_are_broken_deterministically():
    model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 8)))
    with torch.no_grad():
        for layer in lori.lori_layers(model).values():
            layer.b_values.fill_(1.0)
    first, second = extract_masks(model, 0.5), extract_masks(model, 0.5)
    assert all(torch.equal(first[k], second[k]) for k in first)
    names = list(first)
    assert first[names[0]].all() and not first[names[-1]].any()  # earlier layers win ties


def test_masks_round_trip_and_build_lori_s(tmp_path):
    model = trained_model()
    masks = extract_masks(model, 0.9)
    save_masks(masks, tmp_path / "masks.safetensors")
    loaded = load_masks(tmp_path / "masks.safetensors")
    assert all(torch.equal(loaded[k], masks[k]) for k in masks)
    lori_s = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 8)), masks=loaded)
    for name, layer in lori.lori_layers(lori_s).items():
        assert torch.equal(layer.mask(), masks[name])
        assert layer.b_values.abs().sum() == 0  # LoRI-S restarts B from zero


def test_original_lori_mask_files_load(tmp_path):
    """The original LoRI code saves {peft parameter name: tensor} with torch.save."""
    masks = extract_masks(trained_model(), 0.9, block=(1, 1))
    raw = {f"base_model.model.{k}.lora_B.default.weight": v.float() for k, v in masks.items()}
    torch.save(raw, tmp_path / "masks.pt")
    loaded = load_masks(tmp_path / "masks.pt")
    assert set(loaded) == set(masks) and all(torch.equal(loaded[k], masks[k]) for k in masks)


def test_bad_mask_files_and_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        extract_masks(trained_model(), 1.0)
    with pytest.raises(ValueError, match="no LoRI adapters"):
        extract_masks(tiny_model(), 0.9)
    with pytest.raises(FileNotFoundError):
        load_masks(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_masks(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2, 2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="not a LoRI masks file"):
        load_masks(tmp_path / "foreign.safetensors")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="neither a safetensors masks file nor a weights-only torch file"):
        load_masks(tmp_path / "evil.pt")


def test_masks_that_keep_nothing_are_refused(tmp_path):
    """--sparsity 0.9999 used to write masks of zero blocks; LoRI-S then failed with
    "element 0 of tensors does not require grad"."""
    model = trained_model()
    with pytest.raises(ValueError, match="keeps none of the .* blocks"):
        extract_masks(model, 0.9999)
    empty = {k: torch.zeros_like(v) for k, v in extract_masks(model, 0.5).items()}
    with pytest.raises(ValueError, match="keep no element of B"):
        save_masks(empty, tmp_path / "empty.safetensors")
    torch.save({k: v.float() for k, v in empty.items()}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'empty.pt'} keep no element of B"):
        load_masks(tmp_path / "empty.pt")


def test_a_masks_file_of_another_kind_or_damaged_is_named(tmp_path):
    (tmp_path / "masks.json").write_text("{}")
    with pytest.raises(CheckpointError, match="masks.json is not a masks file: expected .safetensors"):
        load_masks(tmp_path / "masks.json")
    path = tmp_path / "masks.safetensors"
    save_masks(extract_masks(trained_model(), 0.5), path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one mask element flipped: still a valid file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_masks(path)
