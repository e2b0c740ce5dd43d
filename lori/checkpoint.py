"""Compact LoRI adapters on disk: seeds and kept blocks (plus the full weights an imported
adapter replaces), nothing else.

A checkpoint is a directory; this code writes format version 2 and reads 1 and 2:

- ``lori_config.json``: format and version, ``"rng": "lori-rng-v1"``, the ``LoRIConfig``,
  the base model's id and a fingerprint of its parameter names and shapes (stored weights
  left out), per adapted layer its ``[out, in]``, kept-block count ``nnz`` and (version 2)
  how its block indices are stored (``"b_blocks"``: ``"pairs"``, ``"bitmap"`` or
  ``"deltas"``), (version 2) ``"stored"``: the shape of each stored weight, and the
  SHA-256 of the tensor file;
- ``adapter.safetensors``: per layer ``<name>.seed`` (int64 holding the uint64 seed in
  two's complement), ``<name>.b_values`` and the kept blocks' indices in the smallest of
  three forms (``encode_b_blocks``; version 1 has only the first):

  - ``<name>.b_blocks``, int32 ``[nnz, 2]``: (block row, block column), sorted;
  - ``<name>.b_bitmap``, uint8 ``[ceil(n / 8)]``: one bit per block of the layer's grid
    of ``n = n_rows * n_cols`` blocks, in row-major order (block ``(i, j)`` is key
    ``k = i * n_cols + j``), key ``k`` at bit ``k % 8`` of byte ``k // 8``, unused bits 0;
  - ``<name>.b_deltas``, uint8: per kept block the gap ``g`` from the previous kept key
    (``g = k - previous - 1``, the first from ``previous = -1``), written as ``g // 255``
    bytes 255 followed by one byte ``g % 255``. At 90% element sparsity that is one byte
    per kept value instead of eight.

  A layer without a seed (imported from PEFT, or merged from adapters with different seeds:
  marked ``"stored_a": true`` in the config) has its A as ``<name>.a`` (float32 ``[r, in]``)
  and seed 0. Stored weights (version 2) are full base-model parameters the adapter
  replaces, e.g. ``model.embed_tokens.weight`` and ``lm_head.weight`` of a vocabulary
  resized for a pad token, imported from PEFT: each is the tensor ``<parameter name>`` in
  its own floating dtype (names as in the base model before ``get_lori_model``). The file's
  safetensors metadata holds ``lori_config_sha256``, the digest of the config (all of it
  but ``adapter_sha256``), so the two files vouch for each other: an edited config is
  refused like a damaged tensor file.

Saving refuses non-finite values before it writes and replaces only these two files
(``lori.files.write_directory``: crash-safe, never touching other files). Loading
completes an interrupted save, then reads and checks everything (format, version,
checksums, names, dtypes, shapes, block indices after decoding: in range, sorted, unique
and as many as the config says; finite values, the base model) before it touches the
model, and names what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn

from lori.adapters import add_adapter, list_adapters
from lori.config import LoRIConfig
from lori.digests import json_digest, safetensors_metadata
from lori.errors import CheckpointError
from lori.files import DirectoryWriter, is_writer, read_json, recover, write_directory
from lori.layer import LoRILinear, is_conv1d, linear_shape, quantized_weight_shapes
from lori.model import lori_layers
from lori.updates import LayerUpdate, install
from lori_kernels import block_sparse, rng

log = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_FILES",
    "CONFIG_FILE",
    "INDEX_ENCODINGS",
    "TENSORS_FILE",
    "AdapterSnapshot",
    "CheckpointError",
    "LoRICheckpoint",
    "base_fingerprint",
    "base_model_id",
    "check_base_model",
    "check_binding",
    "decode_b_blocks",
    "encode_b_blocks",
    "install_adapter",
    "load_lori",
    "read_lori",
    "read_lori_adapter",
    "read_lori_updates",
    "save_lori",
    "stored_weights",
]

FORMAT = "lori-adapter"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
CONFIG_FILE = "lori_config.json"
TENSORS_FILE = "adapter.safetensors"
ADAPTER_FILES = (CONFIG_FILE, TENSORS_FILE)
BINDING_KEY = "lori_config_sha256"  # in the tensor file's metadata: the config's json_digest
B_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# How a layer's kept-block indices are stored (format 2), and the tensor holding them.
INDEX_ENCODINGS = {"pairs": "b_blocks", "bitmap": "b_bitmap", "deltas": "b_deltas"}
_ESCAPE = 255  # a b_deltas byte that adds 255 to the gap and continues it


# ----------------------------------------------------------------------------------------
# Kept-block indices on disk


def _grid(out_features: int, r: int, block) -> tuple[int, int]:
    n_rows, n_cols = block_sparse.block_grid(out_features, r, block)
    return n_rows * n_cols, n_cols


def encode_b_blocks(
    b_blocks: torch.Tensor, out_features: int, r: int, block, encoding: str | None = None
) -> tuple[str, torch.Tensor]:
    """A layer's checked ``b_blocks`` (int32 ``[nnz, 2]``, sorted, unique) in a stored form
    (see the module docstring): ``(encoding, tensor)``, one of ``("pairs", b_blocks)``,
    ``("bitmap", uint8 bits)`` and ``("deltas", uint8 gaps)``; by default the smallest (a
    tie goes to the first of deltas, bitmap, pairs)."""
    n, n_cols = _grid(out_features, r, block)
    b_blocks = b_blocks.detach().to("cpu", torch.int32).contiguous()
    keys = b_blocks[:, 0].long() * n_cols + b_blocks[:, 1].long()
    gaps = torch.diff(keys, prepend=keys.new_full((1,), -1)) - 1
    escapes = torch.div(gaps, _ESCAPE, rounding_mode="floor")
    sizes = {"deltas": keys.numel() + int(escapes.sum()), "bitmap": -(-n // 8), "pairs": b_blocks.nbytes}
    encoding = encoding or min(sizes, key=sizes.__getitem__)
    if encoding == "pairs":
        return encoding, b_blocks
    if encoding == "bitmap":
        bits = torch.zeros(sizes["bitmap"] * 8, dtype=torch.uint8)
        bits[keys] = 1
        weights = torch.tensor([1 << t for t in range(8)], dtype=torch.uint8)
        return encoding, (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
    if encoding != "deltas":
        raise ValueError(f"encoding must be one of {list(INDEX_ENCODINGS)}, got {encoding!r}")
    data = torch.full((sizes["deltas"],), _ESCAPE, dtype=torch.uint8)
    ends = torch.cumsum(escapes + 1, dim=0) - 1
    data[ends] = (gaps - escapes * _ESCAPE).to(torch.uint8)
    return encoding, data


def decode_b_blocks(encoding: str, data: torch.Tensor, nnz: int, out_features: int, r: int, block) -> torch.Tensor:
    """``b_blocks`` (int32 ``[nnz, 2]``) from its stored form (``encode_b_blocks``), without
    a Python loop per block. A bitmap or gap list must decode to exactly ``nnz`` keys in
    the layer's grid (sorted and unique by construction); ``"pairs"`` are returned as they
    are, for ``block_sparse.check_b_blocks``. Raises ValueError saying what is wrong."""
    if encoding == "pairs":
        return data
    name = INDEX_ENCODINGS[encoding]
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"{name} must be a 1-D uint8 tensor, got {data.dtype} {list(data.shape)}")
    n, n_cols = _grid(out_features, r, block)
    if encoding == "bitmap":
        if data.numel() != -(-n // 8):
            raise ValueError(f"{name} must have {-(-n // 8)} bytes for a grid of {n} blocks, got {data.numel()}")
        bits = (data.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
        bits = bits.reshape(-1).bool()
        if bits[n:].any():
            raise ValueError(f"{name} sets bits past the grid's {n} blocks")
        keys = bits.nonzero().squeeze(1)
    else:
        if data.numel() and int(data[-1]) == _ESCAPE:
            raise ValueError(f"{name} ends inside a gap (its last byte is {_ESCAPE})")
        ends = (data != _ESCAPE).nonzero().squeeze(1)
        keys = torch.cumsum(data.long(), dim=0)[ends] + torch.arange(ends.numel())
        if keys.numel() and int(keys[-1]) >= n:
            raise ValueError(f"{name} reaches block key {int(keys[-1])}, past the grid's {n} blocks")
    if keys.numel() != nnz:
        raise ValueError(f"{name} holds {keys.numel()} kept blocks, the config says {nnz}")
    return torch.stack([keys // n_cols, keys % n_cols], dim=1).to(torch.int32)


# ----------------------------------------------------------------------------------------
# Stored weights: full base-model parameters carried by the adapter


def _base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters under their base names (``.base_layer.`` of wrapped layers
    removed), tied ones under each of their names."""
    return {name.replace(".base_layer.", "."): p for name, p in model.named_parameters(remove_duplicate=False)}


def stored_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's stored weights (``model.lori_stored``, set when an adapter carrying them
    is imported or loaded) by base name, gathered whole (a collective under FSDP)."""
    params = _base_parameters(model)
    out = {}
    for name in getattr(model, "lori_stored", ()):
        value = params[name].detach()
        out[name] = value.full_tensor() if hasattr(value, "full_tensor") else value
    return out


def _embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The model's input and output embeddings (Hugging Face models), else None."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    try:
        return (get_in() if get_in else None), (get_out() if get_out else None)
    except NotImplementedError:
        return None, None


def _resize_plan(model: nn.Module, stored: dict[str, torch.Tensor], where) -> tuple[int | None, list]:
    """Check stored weights against ``model``: every one names a parameter of the same
    shape, except the vocabulary rows of a Hugging Face model's input and output
    embeddings (``nn.Embedding``, ``nn.Linear``), which a pad token may have grown; then
    both (one if tied) must be stored with one new vocabulary size. Returns that size (or
    None) and the ``(modules sharing a weight, new weight)`` to resize with."""
    params = _base_parameters(model)
    resizable: dict[int, list[nn.Module]] = {}  # id(weight) -> the embeddings sharing it (two if tied)
    for module in _embeddings(model):
        if isinstance(module, (nn.Embedding, nn.Linear)) and getattr(module, "bias", None) is None:
            resizable.setdefault(id(module.weight), []).append(module)
    vocab, resize, seen = None, {}, {}
    for name, value in stored.items():
        param = params.get(name)
        if param is None:
            raise CheckpointError(f"{where} holds the weight {name}, which the model does not have")
        if id(param) in seen and not torch.equal(value, stored[seen[id(param)]]):
            raise CheckpointError(f"{where} holds different {seen[id(param)]} and {name}, which the model ties")
        seen[id(param)] = name
        if value.shape == param.shape:
            continue
        if id(param) not in resizable or value.dim() != 2 or value.shape[1] != param.shape[1]:
            raise CheckpointError(f"{name} is {list(param.shape)} in the model but {list(value.shape)} in {where}")
        if vocab not in (None, value.shape[0]):
            raise CheckpointError(f"{where} resizes the vocabulary to both {vocab} and {value.shape[0]} rows")
        vocab = value.shape[0]
        resize[id(param)] = (resizable[id(param)], value)
    if vocab is not None and len(resize) != len(resizable):
        raise CheckpointError(
            f"{where} resizes the vocabulary to {vocab} rows but does not store both the input and the output "
            "embeddings' weights"
        )
    return vocab, list(resize.values())


def _vocab_config(model: nn.Module):
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text if hasattr(text, "vocab_size") else None


def _resize(model: nn.Module, vocab: int | None, resize: list) -> Callable[[], None]:
    """Give the embeddings in ``resize`` new parameters with the stored values (their
    vocabulary rows grown or shrunk) and the model's config ``vocab``; returns the undo."""
    if vocab is None:
        return lambda: None
    config = _vocab_config(model)
    before = [(m, m.weight, m.weight.shape[0]) for modules, _ in resize for m in modules]
    config_vocab = getattr(config, "vocab_size", None)

    def set_weight(module: nn.Module, weight: nn.Parameter, rows: int) -> None:
        module.weight = weight
        setattr(module, "num_embeddings" if isinstance(module, nn.Embedding) else "out_features", rows)

    for modules, value in resize:
        old = modules[0].weight
        new = nn.Parameter(value.to(old.device, old.dtype), requires_grad=old.requires_grad)
        for module in modules:
            set_weight(module, new, vocab)
    if config is not None:
        config.vocab_size = vocab

    def undo():
        for module, weight, rows in before:
            set_weight(module, weight, rows)
        if config is not None:
            config.vocab_size = config_vocab

    return undo


def install_adapter(
    model: nn.Module,
    config: LoRIConfig,
    updates: dict[str, LayerUpdate],
    stored: dict[str, torch.Tensor],
    *,
    where,
    backend: str = "auto",
    check: Callable[[], None] | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """``lori.updates.install`` with the adapter's stored weights: checked against the model
    (``where`` names the adapter in messages), the vocabulary resized if they need it, the
    adapters installed (after ``check``, run on the resized model), then the stored values
    copied into the (frozen) base parameters and their names kept in ``model.lori_stored``
    for ``save_lori``. The adapters live on ``device`` (``install``). On any error the model
    is as it was."""
    vocab, resize = _resize_plan(model, stored, where)
    undo = _resize(model, vocab, resize)
    try:
        if check is not None:
            check()
        install(model, config, updates, backend=backend, device=device)
    except BaseException:
        undo()
        raise
    _copy_stored(model, stored)
    if vocab is not None:
        log.info("resized the vocabulary to %d rows for %s", vocab, where)
    return model


def _copy_stored(model: nn.Module, stored: dict[str, torch.Tensor]) -> None:
    params = _base_parameters(model)
    with torch.no_grad():
        for name, value in stored.items():
            _full_copy(params[name], value)
    model.lori_stored = tuple(sorted(stored))


# ----------------------------------------------------------------------------------------
# Saving


def base_fingerprint(model: nn.Module, exclude=()) -> str:
    """SHA-256 of the base model's parameter names and shapes (LoRI parameters and the
    names in ``exclude``, an adapter's stored weights, left out; wrapped layers under their
    original names; a quantized weight by its layer's ``[out, in]``, not its packing), so it
    is the same before and after ``get_lori_model``, before and after an adapter resized the
    vocabulary, and for a base quantized or not."""
    packed = quantized_weight_shapes(model)
    entries = sorted(
        (name, list(packed.get(id(p), p.shape)))
        for name, p in ((n.replace(".base_layer.", "."), p) for n, p in model.named_parameters())
        if not name.endswith("b_values") and name not in exclude
    )
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def base_model_id(model: nn.Module) -> str:
    """The base model's name or path (its config's ``_name_or_path``), else its class."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or type(model).__name__)


def _check_storable(name: str, value: torch.Tensor) -> None:
    if value.dtype not in B_DTYPES:
        raise ValueError(f"cannot save {name} of dtype {value.dtype}: pass dtype=torch.float32")
    if not torch.isfinite(value).all():
        raise ValueError(
            f"cannot save {name}: it holds NaN or Inf in {value.dtype} (a diverged model, or values too large for "
            "the dtype); nothing was written"
        )


class AdapterSnapshot:
    """A model's adapter gathered to CPU (collective under FSDP: every rank takes one),
    ready to be written into a directory. Refuses, before anything is written, values
    that are not finite in the dtype they would be stored in (a diverged model, or
    ``dtype=float16`` overflowing) and dtypes the loader does not read. ``dtype`` applies
    to ``b_values``; stored weights keep the model's dtype. ``adapter_name``: one of the
    model's named adapters (``lori.list_adapters``); default the layers' own."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, adapter_name: str | None = None):
        config = getattr(model, "lori_config", None)
        layers = lori_layers(model)
        if config is None or not layers:
            raise ValueError("the model has no LoRI adapters to save")
        names = list_adapters(model)
        if adapter_name not in (None, names[0]):
            if adapter_name not in names:
                raise ValueError(f"the model has no adapter named {adapter_name!r}; it has {names}")
            layers = {name: layer.lori_adapters[adapter_name] for name, layer in layers.items()}
            config = next(iter(layers.values())).config
        if dtype is not None and dtype not in B_DTYPES:
            raise ValueError(f"cannot store b_values as {dtype}: choose one of {[str(d) for d in B_DTYPES]}")
        self.tensors, shapes, stored = {}, {}, {}
        for name, layer in layers.items():
            values = layer.full_b_values()
            values = values.to(dtype or values.dtype).contiguous().cpu()
            _check_storable(f"{name}.b_values", values)
            b_blocks = layer.b_blocks.detach().cpu()
            encoding, index = encode_b_blocks(b_blocks, layer.out_features, layer.r, layer.block)
            self.tensors[f"{name}.seed"] = layer.seed.detach().reshape(1).cpu()
            self.tensors[f"{name}.b_values"] = values
            self.tensors[f"{name}.{INDEX_ENCODINGS[encoding]}"] = index
            shapes[name] = {
                "shape": [layer.out_features, layer.in_features],
                "nnz": b_blocks.shape[0],
                "b_blocks": encoding,
            }
            if layer.stored_a is not None:
                self.tensors[f"{name}.a"] = layer.stored_a.detach().contiguous().cpu()
                shapes[name]["stored_a"] = True
        for name, value in (stored_weights(model) if adapter_name in (None, names[0]) else {}).items():
            value = value.contiguous().cpu()
            _check_storable(name, value)
            if name in self.tensors:
                raise ValueError(f"the stored weight {name} has the name of an adapter tensor")
            self.tensors[name] = value
            stored[name] = {"shape": list(value.shape)}
        self.manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "rng": rng.RNG_VERSION,
            "config": config.to_dict(),
            "base_model": {"id": base_model_id(model), "fingerprint": base_fingerprint(model, stored)},
            "layers": shapes,
            "stored": stored,
        }

    def write(self, out: DirectoryWriter) -> str:
        """Write the two files through ``out``; returns the tensor file's SHA-256."""
        tensors_file = out.file(TENSORS_FILE)
        save_file(self.tensors, tensors_file, metadata={BINDING_KEY: json_digest(self.manifest)})
        digest = hashlib.sha256(tensors_file.read_bytes()).hexdigest()
        out.file(CONFIG_FILE).write_text(json.dumps({**self.manifest, "adapter_sha256": digest}, indent=1))
        return digest


def save_lori(
    model: nn.Module,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    adapter_name: str | None = None,
    keep_others: bool = False,
) -> Path:
    """Write the model's LoRI adapter to the directory ``path``; ``b_values`` are stored
    in ``dtype`` (default: as trained), stored weights (``model.lori_stored``) as the model
    holds them. Only the adapter's two files are replaced, safely against crashes; a
    directory holding other files is refused, unless ``keep_others`` (they stay as they
    are: ``save_pretrained`` into a Trainer's output directory). Under FSDP every rank calls
    it and rank 0 writes. ``adapter_name`` picks one of several named adapters
    (``lori.list_adapters``; default: the layers' own, the first loaded). Returns ``path``."""
    snapshot = AdapterSnapshot(model, dtype, adapter_name)
    path = Path(path)
    if is_writer():
        with write_directory(path, ADAPTER_FILES, what="LoRI adapter", keep_others=keep_others) as out:
            snapshot.write(out)
        log.info(
            "saved LoRI adapter: %d layers, %d kept blocks, %d bytes -> %s",
            len(snapshot.manifest["layers"]),
            sum(s["nnz"] for s in snapshot.manifest["layers"].values()),
            (path / TENSORS_FILE).stat().st_size,
            path,
        )
    return path


# ----------------------------------------------------------------------------------------
# Reading


class LoRICheckpoint(NamedTuple):
    """A checkpoint read and checked by ``read_lori``: its ``manifest`` (the parsed
    ``lori_config.json``), per layer its tensors ``seed``, ``b_values``, ``b_blocks``
    (decoded, int32 ``[nnz, 2]``) and, with a stored A, ``a``; and its stored weights by
    base-model parameter name."""

    manifest: dict
    layers: dict[str, dict[str, torch.Tensor]]
    stored: dict[str, torch.Tensor]


_JSON_NAMES = {dict: "object", str: "string"}


def _check_manifest(manifest, where: Path) -> LoRIConfig:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{where} is not a LoRI adapter config (format {found!r})")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READ_VERSIONS:
        raise CheckpointError(f"{where} has format version {version!r}; this code reads {list(READ_VERSIONS)}")
    if manifest.get("rng") != rng.RNG_VERSION:
        raise CheckpointError(f"{where} needs the generator {manifest.get('rng')!r}; this code has {rng.RNG_VERSION}")
    kinds = {"config": dict, "base_model": dict, "layers": dict, "adapter_sha256": str}
    if version >= 2:
        kinds["stored"] = dict
    for key, kind in kinds.items():
        if not isinstance(manifest.get(key), kind):
            found = "no" if key not in manifest else f"a {type(manifest[key]).__name__} as its"
            raise CheckpointError(f"{where} has {found} {key!r} entry (a JSON {_JSON_NAMES[kind]} is needed)")
    base = manifest["base_model"]
    if not all(isinstance(base.get(k), str) for k in ("id", "fingerprint")):
        raise CheckpointError(f"{where}: 'base_model' must hold the strings 'id' and 'fingerprint', got {base!r}")
    try:
        return LoRIConfig.from_dict(manifest["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad LoRI config: {e}") from None


def _encoding(manifest: dict, name: str, info: dict, where: Path) -> str:
    """How layer ``name``'s block indices are stored: pairs in format 1, as recorded in 2."""
    if manifest["format_version"] == 1:
        return "pairs"
    encoding = info.get("b_blocks")
    if encoding not in INDEX_ENCODINGS:
        raise CheckpointError(
            f"{where}: layer {name} stores its blocks as {encoding!r}, not one of {list(INDEX_ENCODINGS)}"
        )
    return encoding


def _layer_tensors(name: str, info: dict, encoding: str) -> dict[str, str]:
    """Kind -> tensor name of a layer's tensors in the file."""
    kinds = ["seed", "b_values", INDEX_ENCODINGS[encoding]]
    if info.get("stored_a") is True:
        kinds.append("a")
    return {kind: f"{name}.{kind}" for kind in kinds}


def _stored_entries(manifest: dict) -> dict[str, dict]:
    return manifest.get("stored", {}) if manifest["format_version"] >= 2 else {}


def read_lori(path: str | Path) -> LoRICheckpoint:
    """Read and check a checkpoint without a model (see ``LoRICheckpoint``); the seed is
    a Python-int-valued int64. A save that a crash interrupted is completed first."""
    path = Path(path)
    recover(path)
    config_file, tensors_file = path / CONFIG_FILE, path / TENSORS_FILE
    manifest = read_json(config_file, "LoRI adapter")
    config = _check_manifest(manifest, config_file)
    data, tensors = read_tensors(tensors_file, manifest["adapter_sha256"], config_file, "LoRI adapter")
    check_binding(data, {k: v for k, v in manifest.items() if k != "adapter_sha256"}, tensors_file, config_file)
    layers, stored_info = manifest["layers"], _stored_entries(manifest)
    if not layers:
        raise CheckpointError(f"{config_file} lists no layers")
    if not all(isinstance(info, dict) for info in (*layers.values(), *stored_info.values())):
        raise CheckpointError(f"{config_file}: every layer and stored weight entry must be an object")
    encodings = {name: _encoding(manifest, name, info, config_file) for name, info in layers.items()}
    names = {name: _layer_tensors(name, info, encodings[name]) for name, info in layers.items()}
    expected = [key for kinds in names.values() for key in kinds.values()] + list(stored_info)
    if len(set(expected)) != len(expected):
        raise CheckpointError(f"{config_file}: a stored weight has the name of a layer's tensor")
    if set(tensors) != set(expected):
        extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise CheckpointError(
            f"{tensors_file} does not hold exactly the layers of {CONFIG_FILE}: "
            f"unexpected {extra[:3]}, missing {missing[:3]}"
        )
    per_layer, stored = {}, {}
    try:
        for name, info in layers.items():
            t = {kind: tensors[key] for kind, key in names[name].items()}
            per_layer[name] = _check_layer(name, info, t, encodings[name], config)
        for name, info in stored_info.items():
            stored[name] = _check_stored(name, info, tensors[name])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return LoRICheckpoint(manifest, per_layer, stored)


def read_tensors(path: Path, sha256: str, manifest_file: Path, what: str) -> tuple[bytes, dict[str, torch.Tensor]]:
    """The bytes and tensors of the safetensors file ``path`` of a ``what`` whose manifest
    ``manifest_file`` holds its ``sha256``; a missing, unreadable, truncated or corrupted file
    raises a ``CheckpointError`` that names it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} is not a {what}: {path.name} is missing") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"{path} does not match the checksum in {manifest_file.name}: truncated or corrupted")
    try:
        return data, load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def check_binding(data: bytes, manifest: dict, tensors_file: Path, manifest_file: Path) -> None:
    """Check that a safetensors file (its bytes, checksum already verified) was written
    with ``manifest``: its metadata's ``lori_config_sha256`` is the manifest's digest.
    Files written before the binding existed have none and are read with a warning."""
    bound = safetensors_metadata(data).get(BINDING_KEY)
    if bound is None:
        log.warning("%s predates config checksums: %s is not verified", tensors_file, manifest_file.name)
    elif bound != json_digest(manifest):
        raise CheckpointError(
            f"{manifest_file} was changed after it was saved (it does not match {tensors_file.name}'s record of it)"
        )


def _is_shape(shape, dims: int | None = None) -> bool:
    return (
        isinstance(shape, list)
        and (dims is None or len(shape) == dims)
        and all(type(v) is int and v > 0 for v in shape)
    )


def _check_values(name: str, value: torch.Tensor) -> None:
    if value.dtype not in B_DTYPES:
        raise CheckpointError(f"{name} must be float32, bfloat16, float16 or float64, got {value.dtype}")
    if not torch.isfinite(value).all():
        raise CheckpointError(f"{name} holds NaN or Inf")


def _check_layer(
    name: str, info: dict, t: dict[str, torch.Tensor], encoding: str, config: LoRIConfig
) -> dict[str, torch.Tensor]:
    """A layer's tensors checked, its block indices decoded into ``b_blocks``."""
    shape, nnz = info.get("shape"), info.get("nnz")
    if not _is_shape(shape, 2):
        raise CheckpointError(f"layer {name}: bad shape entry {shape!r} (want [out, in], positive ints)")
    if type(nnz) is not int or nnz < 0:
        raise CheckpointError(f"layer {name}: bad kept-block count {nnz!r} in {CONFIG_FILE}")
    out, inp = shape
    if t["seed"].dtype != torch.int64 or t["seed"].numel() != 1:
        raise CheckpointError(f"{name}.seed must be one int64, got {t['seed'].dtype} {tuple(t['seed'].shape)}")
    _check_values(f"{name}.b_values", t["b_values"])
    try:
        b_blocks = decode_b_blocks(encoding, t.pop(INDEX_ENCODINGS[encoding]), nnz, out, config.r, config.block)
        block_sparse.check_b_layout(t["b_values"], b_blocks, config.block)
        block_sparse.check_b_blocks(b_blocks, out, config.r, config.block)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"layer {name}: {e}") from None
    if nnz != b_blocks.shape[0]:
        raise CheckpointError(
            f"layer {name}: {CONFIG_FILE} says {nnz} kept blocks, the tensors hold {b_blocks.shape[0]}"
        )
    t["b_blocks"] = b_blocks
    a = t.get("a")
    if a is not None:
        if a.dtype != torch.float32 or tuple(a.shape) != (config.r, inp):
            raise CheckpointError(
                f"{name}.a must be float32 of shape {[config.r, inp]} (r, in), got {a.dtype} {list(a.shape)}"
            )
        if not torch.isfinite(a).all():
            raise CheckpointError(f"{name}.a holds NaN or Inf")
    return t


def _check_stored(name: str, info: dict, value: torch.Tensor) -> torch.Tensor:
    if not _is_shape(info.get("shape")) or info["shape"] != list(value.shape):
        raise CheckpointError(
            f"stored weight {name}: {CONFIG_FILE} gives the shape {info.get('shape')!r}, the tensor is "
            f"{list(value.shape)}"
        )
    _check_values(name, value)
    return value


# ----------------------------------------------------------------------------------------
# Loading


def load_lori(
    model: nn.Module,
    path: str | Path,
    *,
    check_base: bool = True,
    backend: str = "auto",
    adapter_name: str | None = None,
) -> nn.Module:
    """Load the adapter at ``path`` into ``model`` and return it. A model without
    adapters gets them (with the checkpoint's masks) and the checkpoint's stored weights
    (its vocabulary resized to theirs if needed); a model with adapters must have the
    checkpoint's layers, kept blocks and stored weights. With ``check_base`` the base
    model's fingerprint must match. Everything is checked first: on any error the model
    is untouched.

    With ``adapter_name`` (PEFT's ``load_adapter``): a model without adapters gets this one
    under that name (active); a model with adapters gets it beside them, inactive
    (``lori.set_adapter``, ``lori.adapter_batch``), whatever its seed, r and block, if it
    adapts the same modules and stores no base weights; the base and the other adapters are
    not touched."""
    manifest, per_layer, stored = read_lori(path)
    config = LoRIConfig.from_dict(manifest["config"])
    if check_base:
        check_base_model(manifest, model, path)
    existing = lori_layers(model)

    def check_shapes():
        modules = dict(model.named_modules())
        for name, info in manifest["layers"].items():
            module = existing.get(name, modules.get(name))
            if module is None:
                raise CheckpointError(f"{path} adapts {name}, which the model does not have")
            if isinstance(module, LoRILinear):
                shape = [module.out_features, module.in_features]
            elif isinstance(module, nn.Linear) or is_conv1d(module):
                shape = list(linear_shape(module))
            else:
                shape = None
            if shape != list(info["shape"]):
                raise CheckpointError(f"{name} is {shape} in the model but {info['shape']} in {path}")

    if existing and adapter_name is not None:
        if stored:
            raise CheckpointError(
                f"{path} replaces base weights {sorted(stored)[:3]}, so it cannot be loaded beside other adapters"
            )
        try:
            add_adapter(model, adapter_name, config, per_layer, path, check=check_shapes)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        return model
    if not existing:
        updates = _updates(config, manifest, per_layer)
        install_adapter(model, config, updates, stored, where=path, backend=backend, check=check_shapes)
        if adapter_name is not None:
            for layer in lori_layers(model).values():
                layer.adapter_name = layer.active_adapter = adapter_name
        log.info("loaded LoRI adapter from %s: %d layers", path, len(updates))
        return model
    check_shapes()
    if set(existing) != set(per_layer):
        raise CheckpointError(f"the model's adapted layers differ from {path}'s")
    for name, layer in existing.items():
        if (
            layer.block != config.block
            or layer.r != config.r
            or (layer.stored_a is not None) != ("a" in per_layer[name])
            or not torch.equal(layer.b_blocks.cpu(), per_layer[name]["b_blocks"])
        ):
            raise CheckpointError(
                f"{name}: the model's adapter (r, block, stored A or kept blocks) differs from {path}'s; "
                "load into the base model instead"
            )
    params = _base_parameters(model)
    if set(getattr(model, "lori_stored", ())) != set(stored) or any(
        params[n].shape != v.shape for n, v in stored.items()
    ):
        raise CheckpointError(
            f"the model's stored weights differ from {path}'s {sorted(stored)}; load into the base model instead"
        )
    with torch.no_grad():
        for name, layer in existing.items():
            t = per_layer[name]
            layer.seed.copy_(t["seed"].reshape(()))
            layer.layer_seed = rng.to_uint64(layer.seed)
            _full_copy(layer.b_values, t["b_values"])
            if "a" in t:
                layer.stored_a.copy_(t["a"])
    _copy_stored(model, stored)
    log.info("loaded LoRI adapter from %s into the model's adapter: %d layers", path, len(existing))
    return model


def check_base_model(manifest: dict, model: nn.Module, path: str | Path) -> None:
    """Refuse an adapter (its checked manifest) trained on a base model other than
    ``model``: parameter names or shapes differ (the adapter's stored weights aside)."""
    if manifest["base_model"]["fingerprint"] != base_fingerprint(model, _stored_entries(manifest)):
        raise CheckpointError(
            f"{path} was trained on another base model ({manifest['base_model']['id']!r}): parameter names "
            "or shapes differ (pass check_base=False to load anyway)"
        )


def read_lori_adapter(
    path: str | Path, *, base: nn.Module | None = None
) -> tuple[LoRIConfig, dict[str, LayerUpdate], dict[str, torch.Tensor]]:
    """A checkpoint read and checked (``read_lori``) as its config, per-layer updates and
    stored weights (for ``install_adapter``); with ``base``, it must have been trained on
    that base model (``check_base_model``)."""
    manifest, per_layer, stored = read_lori(path)
    if base is not None:
        check_base_model(manifest, base, path)
    config = LoRIConfig.from_dict(manifest["config"])
    return config, _updates(config, manifest, per_layer), stored


def read_lori_updates(path: str | Path, *, base: nn.Module | None = None) -> tuple[LoRIConfig, dict[str, LayerUpdate]]:
    """``read_lori_adapter`` without the stored weights: a warning names them if there are
    any (``load_lori`` carries them)."""
    config, updates, stored = read_lori_adapter(path, base=base)
    if stored:
        log.warning(
            "%s stores the full weights %s, which are not carried with its layer updates (load_lori carries them)",
            path,
            sorted(stored),
        )
    return config, updates


def _updates(config: LoRIConfig, manifest: dict, per_layer: dict[str, dict[str, torch.Tensor]]) -> dict:
    return {name: _update(t, manifest["layers"][name], config) for name, t in per_layer.items()}


def _update(t: dict[str, torch.Tensor], info: dict, config: LoRIConfig) -> LayerUpdate:
    out, inp = info["shape"]
    stored = "a" in t
    return LayerUpdate(
        b=block_sparse.scatter_blocks(t["b_values"].float(), t["b_blocks"], out, config.r),
        mask=block_sparse.mask_from_blocks(t["b_blocks"], out, config.r, config.block),
        scaling=config.scaling,
        in_features=inp,
        block=config.block,
        dist=config.dist,
        seed=None if stored else rng.to_uint64(t["seed"]),
        a=t["a"] if stored else None,
    )


def _full_copy(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into a parameter, which may be an FSDP-sharded DTensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        param.copy_(distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements))
    else:
        param.copy_(value)
