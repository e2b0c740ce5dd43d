"""Compact LoRI adapters on disk: seeds and kept blocks, nothing else.

A checkpoint is a directory:

- ``lori_config.json``: format and version, ``"rng": "lori-rng-v1"``, the ``LoRIConfig``,
  the base model's id and a fingerprint of its parameter names and shapes, each adapted
  layer's ``[out, in]`` and kept-block count, and the SHA-256 of the tensor file;
- ``adapter.safetensors``: per layer ``<name>.seed`` (int64 holding the uint64 seed in
  two's complement), ``<name>.b_values`` and ``<name>.b_blocks``; a layer without a seed
  (imported from PEFT, or merged from adapters with different seeds: marked
  ``"stored_a": true`` in the config) has its A as ``<name>.a`` (float32 ``[r, in]``) and
  seed 0. Its safetensors metadata holds ``lori_config_sha256``, the digest of the config
  (all of it but ``adapter_sha256``), so the two files vouch for each other: an edited
  config is refused like a damaged tensor file.

Saving refuses non-finite values before it writes and replaces only these two files
(``lori.files.write_directory``: crash-safe, never touching other files). Loading
completes an interrupted save, then reads and checks everything (format, version,
checksums, names, dtypes, shapes, block indices, finite values, the base model) before
it touches the model, and names what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from lori.config import LoRIConfig
from lori.digests import json_digest, safetensors_metadata
from lori.errors import CheckpointError
from lori.files import DirectoryWriter, is_writer, read_json, recover, write_directory
from lori.model import lori_layers
from lori.updates import LayerUpdate, install
from lori_kernels import block_sparse, rng

log = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_FILES",
    "CONFIG_FILE",
    "TENSORS_FILE",
    "AdapterSnapshot",
    "CheckpointError",
    "base_fingerprint",
    "check_binding",
    "base_model_id",
    "check_base_model",
    "load_lori",
    "read_lori",
    "read_lori_updates",
    "save_lori",
]

FORMAT = "lori-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "lori_config.json"
TENSORS_FILE = "adapter.safetensors"
ADAPTER_FILES = (CONFIG_FILE, TENSORS_FILE)
BINDING_KEY = "lori_config_sha256"  # in the tensor file's metadata: the config's json_digest
_KINDS = ("seed", "b_values", "b_blocks")
B_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def base_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the base model's parameter names and shapes (LoRI parameters left out,
    wrapped layers under their original names), so it is the same before and after
    ``get_lori_model``."""
    entries = sorted(
        (name.replace(".base_layer.", "."), list(p.shape))
        for name, p in model.named_parameters()
        if not name.endswith("b_values")
    )
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def base_model_id(model: torch.nn.Module) -> str:
    """The base model's name or path (its config's ``_name_or_path``), else its class."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or type(model).__name__)


class AdapterSnapshot:
    """A model's adapter gathered to CPU (collective under FSDP: every rank takes one),
    ready to be written into a directory. Refuses, before anything is written, values
    that are not finite in the dtype they would be stored in (a diverged model, or
    ``dtype=float16`` overflowing) and dtypes the loader does not read."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None):
        config = getattr(model, "lori_config", None)
        layers = lori_layers(model)
        if config is None or not layers:
            raise ValueError("the model has no LoRI adapters to save")
        if dtype is not None and dtype not in B_DTYPES:
            raise ValueError(f"cannot store b_values as {dtype}: choose one of {[str(d) for d in B_DTYPES]}")
        self.tensors, shapes = {}, {}
        for name, layer in layers.items():
            values = layer.full_b_values()
            values = values.to(dtype or values.dtype).contiguous().cpu()
            if values.dtype not in B_DTYPES:
                raise ValueError(f"cannot save {name}.b_values of dtype {values.dtype}: pass dtype=torch.float32")
            if not torch.isfinite(values).all():
                raise ValueError(
                    f"cannot save {name}.b_values: it holds NaN or Inf in {values.dtype} (a diverged model, or "
                    "values too large for the dtype); nothing was written"
                )
            self.tensors[f"{name}.seed"] = layer.seed.detach().reshape(1).cpu()
            self.tensors[f"{name}.b_values"] = values
            self.tensors[f"{name}.b_blocks"] = layer.b_blocks.detach().contiguous().cpu()
            shapes[name] = {"shape": [layer.out_features, layer.in_features], "nnz": layer.b_blocks.shape[0]}
            if layer.stored_a is not None:
                self.tensors[f"{name}.a"] = layer.stored_a.detach().contiguous().cpu()
                shapes[name]["stored_a"] = True
        self.manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "rng": rng.RNG_VERSION,
            "config": config.to_dict(),
            "base_model": {"id": base_model_id(model), "fingerprint": base_fingerprint(model)},
            "layers": shapes,
        }

    def write(self, out: DirectoryWriter) -> str:
        """Write the two files through ``out``; returns the tensor file's SHA-256."""
        tensors_file = out.file(TENSORS_FILE)
        save_file(self.tensors, tensors_file, metadata={BINDING_KEY: json_digest(self.manifest)})
        digest = hashlib.sha256(tensors_file.read_bytes()).hexdigest()
        out.file(CONFIG_FILE).write_text(json.dumps({**self.manifest, "adapter_sha256": digest}, indent=1))
        return digest


def save_lori(model: torch.nn.Module, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write the model's LoRI adapter to the directory ``path``; ``b_values`` are stored
    in ``dtype`` (default: as trained). Only the adapter's two files are replaced, safely
    against crashes; a directory holding other files is refused. Under FSDP every rank
    calls it and rank 0 writes. Returns ``path``."""
    snapshot = AdapterSnapshot(model, dtype)
    path = Path(path)
    if is_writer():
        with write_directory(path, ADAPTER_FILES, what="LoRI adapter") as out:
            snapshot.write(out)
        log.info(
            "saved LoRI adapter: %d layers, %d kept blocks, %d bytes -> %s",
            len(snapshot.manifest["layers"]),
            sum(s["nnz"] for s in snapshot.manifest["layers"].values()),
            (path / TENSORS_FILE).stat().st_size,
            path,
        )
    return path


_JSON_NAMES = {dict: "object", str: "string"}


def _check_manifest(manifest, where: Path) -> LoRIConfig:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{where} is not a LoRI adapter config (format {found!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format version {manifest.get('format_version')!r}; this code reads {FORMAT_VERSION}"
        )
    if manifest.get("rng") != rng.RNG_VERSION:
        raise CheckpointError(f"{where} needs the generator {manifest.get('rng')!r}; this code has {rng.RNG_VERSION}")
    kinds = {"config": dict, "base_model": dict, "layers": dict, "adapter_sha256": str}
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


def read_lori(path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Read and check a checkpoint without a model: its manifest and, per layer, the
    tensors ``seed`` (a Python-int-valued int64), ``b_values``, ``b_blocks`` and, for a
    layer with a stored A, ``a``. A save that a crash interrupted is completed first."""
    path = Path(path)
    recover(path)
    config_file, tensors_file = path / CONFIG_FILE, path / TENSORS_FILE
    manifest = read_json(config_file, "LoRI adapter")
    config = _check_manifest(manifest, config_file)
    data = _read_bytes(tensors_file, "LoRI adapter")
    if hashlib.sha256(data).hexdigest() != manifest["adapter_sha256"]:
        raise CheckpointError(f"{tensors_file} does not match the checksum in {CONFIG_FILE}: truncated or corrupted")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{tensors_file} is not a readable safetensors file: {e}") from None
    check_binding(data, {k: v for k, v in manifest.items() if k != "adapter_sha256"}, tensors_file, config_file)
    layers = manifest["layers"]
    if not layers:
        raise CheckpointError(f"{config_file} lists no layers")
    if not all(isinstance(info, dict) for info in layers.values()):
        raise CheckpointError(f"{config_file}: every layer entry must be an object")
    expected = {f"{name}.{kind}" for name, info in layers.items() for kind in _kinds(info)}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(set(expected) - set(tensors))
        raise CheckpointError(
            f"{tensors_file} does not hold exactly the layers of {CONFIG_FILE}: "
            f"unexpected {extra[:3]}, missing {missing[:3]}"
        )
    per_layer = {}
    for name, info in layers.items():
        t = {kind: tensors[f"{name}.{kind}"] for kind in _kinds(info)}
        try:
            _check_layer(name, info, t, config)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        per_layer[name] = t
    return manifest, per_layer


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} is not a {what}: {path.name} is missing") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


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


def _kinds(info: dict) -> tuple[str, ...]:
    return (*_KINDS, "a") if info.get("stored_a") is True else _KINDS


def _check_layer(name: str, info, t: dict[str, torch.Tensor], config: LoRIConfig) -> None:
    shape = info.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int and v > 0 for v in shape)):
        raise CheckpointError(f"layer {name}: bad shape entry {shape!r} (want [out, in], positive ints)")
    out, inp = shape
    if t["seed"].dtype != torch.int64 or t["seed"].numel() != 1:
        raise CheckpointError(f"{name}.seed must be one int64, got {t['seed'].dtype} {tuple(t['seed'].shape)}")
    if t["b_values"].dtype not in B_DTYPES:
        raise CheckpointError(
            f"{name}.b_values must be float32, bfloat16, float16 or float64, got {t['b_values'].dtype}"
        )
    if not torch.isfinite(t["b_values"]).all():
        raise CheckpointError(f"{name}.b_values holds NaN or Inf")
    try:
        block_sparse.check_b_layout(t["b_values"], t["b_blocks"], config.block)
        block_sparse.check_b_blocks(t["b_blocks"], out, config.r, config.block)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"layer {name}: {e}") from None
    if info.get("nnz") != t["b_blocks"].shape[0]:
        raise CheckpointError(
            f"layer {name}: {CONFIG_FILE} says {info.get('nnz')} kept blocks, the tensors hold {t['b_blocks'].shape[0]}"
        )
    a = t.get("a")
    if a is not None:
        if a.dtype != torch.float32 or tuple(a.shape) != (config.r, inp):
            raise CheckpointError(
                f"{name}.a must be float32 of shape {[config.r, inp]} (r, in), got {a.dtype} {list(a.shape)}"
            )
        if not torch.isfinite(a).all():
            raise CheckpointError(f"{name}.a holds NaN or Inf")


def load_lori(
    model: torch.nn.Module, path: str | Path, *, check_base: bool = True, backend: str = "auto"
) -> torch.nn.Module:
    """Load the adapter at ``path`` into ``model`` and return it. A model without
    adapters gets them (with the checkpoint's masks); a model with adapters must have the
    checkpoint's layers and kept blocks. With ``check_base`` the base model's fingerprint
    must match. Everything is checked first: on any error the model is untouched."""
    manifest, per_layer = read_lori(path)
    config = LoRIConfig.from_dict(manifest["config"])
    if check_base:
        check_base_model(manifest, model, path)
    existing = lori_layers(model)
    modules = dict(model.named_modules())
    for name, info in manifest["layers"].items():
        module = existing.get(name, modules.get(name))
        if module is None:
            raise CheckpointError(f"{path} adapts {name}, which the model does not have")
        shape = [module.out_features, module.in_features] if hasattr(module, "out_features") else None
        if shape != list(info["shape"]):
            raise CheckpointError(f"{name} is {shape} in the model but {info['shape']} in {path}")
    if not existing:
        updates = _updates(config, manifest, per_layer)
        install(model, config, updates, backend=backend)
        log.info("loaded LoRI adapter from %s: %d layers", path, len(updates))
        return model
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
    with torch.no_grad():
        for name, layer in existing.items():
            t = per_layer[name]
            layer.seed.copy_(t["seed"].reshape(()))
            layer.layer_seed = rng.to_uint64(layer.seed)
            _full_copy(layer.b_values, t["b_values"])
            if "a" in t:
                layer.stored_a.copy_(t["a"])
    log.info("loaded LoRI adapter from %s into the model's adapter: %d layers", path, len(existing))
    return model


def check_base_model(manifest: dict, model: torch.nn.Module, path: str | Path) -> None:
    """Refuse an adapter (its checked manifest) trained on a base model other than
    ``model``: parameter names or shapes differ."""
    if manifest["base_model"]["fingerprint"] != base_fingerprint(model):
        raise CheckpointError(
            f"{path} was trained on another base model ({manifest['base_model']['id']!r}): parameter names "
            "or shapes differ (pass check_base=False to load anyway)"
        )


def read_lori_updates(
    path: str | Path, *, base: torch.nn.Module | None = None
) -> tuple[LoRIConfig, dict[str, LayerUpdate]]:
    """A checkpoint read and checked (``read_lori``) as its config and per-layer updates;
    with ``base``, it must have been trained on that base model (``check_base_model``)."""
    manifest, per_layer = read_lori(path)
    if base is not None:
        check_base_model(manifest, base, path)
    config = LoRIConfig.from_dict(manifest["config"])
    return config, _updates(config, manifest, per_layer)


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
