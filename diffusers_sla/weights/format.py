# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The file format of `sla_attention.safetensors` (format `SLA_FORMAT_VERSION`): writing, reading and checking it.

* one float32 tensor per SLA parameter, named after the attention module's path without the `sla.` part:
  `transformer_blocks.0.attn.proj_l.weight`, `transformer_blocks.0.attn.proj_l.bias`;
* string metadata (`build_metadata`, the one place that writes it): `format` (`"pt"`), `diffusers_sla_format` (the
  format version), `diffusers_sla_version`, `sla_config` (the `SLAConfig` as JSON), `head_dims` (JSON
  `{attention path: head_dim}`), `model_class`, and `sla_layer_configs` (JSON `{attention path: operator fields}`)
  only for layers whose operator differs from `sla_config`, and, when `save_pretrained` wrote it, `base_weights`
  (JSON `{file name: {"size", "sampled_sha256"}}` of the base weight files written by the same save), so that SLA
  weights found beside other base weights (an interrupted save, a copied file) are detected on load. Converted files
  add `converted_from`.

The file lives beside the transformer's own weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffusers_sla import __version__
from diffusers_sla.config import SLA_FORMAT_VERSION, SLAConfig
from diffusers_sla.integration.layer import SparseLinearAttention

# Metadata keys of SLA_WEIGHTS_NAME.
METADATA_FORMAT_KEY = "diffusers_sla_format"
METADATA_VERSION_KEY = "diffusers_sla_version"
METADATA_CONFIG_KEY = "sla_config"
METADATA_LAYER_CONFIGS_KEY = "sla_layer_configs"
METADATA_HEAD_DIMS_KEY = "head_dims"
METADATA_MODEL_CLASS_KEY = "model_class"
METADATA_BASE_WEIGHTS_KEY = "base_weights"

# The base weights' fingerprint hashes this many evenly spaced chunks of each file (the whole file when smaller):
# multi-GB files are checked in milliseconds, and fine-tuning changes the weights everywhere.
FINGERPRINT_CHUNKS = 16
FINGERPRINT_CHUNK_BYTES = 64 * 1024


def sla_entry_names(path: str, layer: SparseLinearAttention | None = None) -> list[str]:
    """File entries of the SLA layer held by the attention module at `path` (`""` for the model itself): `proj_l`'s,
    and with `layer` also those of its fusion's parameters."""
    prefix = f"{path}." if path else ""
    names = SparseLinearAttention.sla_parameter_names if layer is None else layer.sla_parameter_names
    return [prefix + name for name in names]


def build_metadata(model_class: str, config: SLAConfig, head_dims: dict[str, int], *,
                   layer_configs: dict[str, dict] | None = None, base_weights: dict[str, dict] | None = None,
                   converted_from: str | None = None) -> dict[str, str]:
    """The string metadata of an SLA weights file (see the module docstring)."""
    metadata = {
        "format": "pt",
        METADATA_FORMAT_KEY: SLA_FORMAT_VERSION,
        METADATA_VERSION_KEY: __version__,
        METADATA_CONFIG_KEY: json.dumps(config.to_dict(), sort_keys=True),
        METADATA_HEAD_DIMS_KEY: json.dumps(head_dims),
        METADATA_MODEL_CLASS_KEY: model_class,
    }
    if layer_configs:
        metadata[METADATA_LAYER_CONFIGS_KEY] = json.dumps(layer_configs, sort_keys=True)
    if base_weights:
        metadata[METADATA_BASE_WEIGHTS_KEY] = json.dumps(base_weights, sort_keys=True)
    if converted_from is not None:
        metadata["converted_from"] = converted_from
    return metadata


# ===== Writing =====


def fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on some platforms: nothing to sync there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fingerprint(path: str) -> dict[str, Any]:
    """`{"size", "sampled_sha256"}` of a file: its size, and the SHA-256 of `FINGERPRINT_CHUNKS` evenly spaced
    chunks."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= FINGERPRINT_CHUNKS * FINGERPRINT_CHUNK_BYTES:
            digest.update(handle.read())
        else:
            step = (size - FINGERPRINT_CHUNK_BYTES) // (FINGERPRINT_CHUNKS - 1)
            for index in range(FINGERPRINT_CHUNKS):
                handle.seek(index * step)
                digest.update(handle.read(FINGERPRINT_CHUNK_BYTES))
    return {"size": size, "sampled_sha256": digest.hexdigest()}


def write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], filename: str) -> None:
    # Write beside the target and rename: an interrupted save never leaves a truncated file under the real name.
    directory = os.path.dirname(os.path.abspath(filename))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sla_attention.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        fsync(tmp)  # the data is on disk before the rename makes it visible under the real name
        os.replace(tmp, filename)
        fsync(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ===== Reading and checking =====


@dataclass
class SLAWeightsFile:
    """The parsed contents of an `sla_attention.safetensors` file."""

    path: str
    tensors: dict[str, torch.Tensor]
    config: SLAConfig
    metadata: dict[str, str]
    # Operator config of the layers that differ from `config`, by attention path.
    layer_configs: dict[str, SLAConfig] = field(default_factory=dict)
    # `{file name: {"size", "sampled_sha256"}}` of the base weights saved with these SLA weights (may be empty).
    base_weights: dict[str, dict[str, Any]] = field(default_factory=dict)

    def config_for(self, path: str) -> SLAConfig:
        return self.layer_configs.get(path, self.config)


def read_sla_file(path: str | os.PathLike) -> SLAWeightsFile:
    """Read and check an `sla_attention.safetensors` file (format, metadata, config). Raises `ValueError` with the
    reason when it is not a valid SLA weights file."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types (and OSError) for damaged files
        hint = ""
        if path.endswith((".pt", ".pth", ".bin", ".ckpt")):
            hint = " Pickled checkpoints are never loaded directly: convert them with `diffusers_sla.converters`."
        raise ValueError(
            f"Could not read SLA weights from {path}: not a valid safetensors file (truncated, or another format such "
            f"as a pickled `sla_attention.pt`): {err}.{hint}"
        ) from err

    version = metadata.get(METADATA_FORMAT_KEY)
    if version is None:
        raise ValueError(
            f"{path} is a safetensors file but not SLA weights written by diffusers-sla: its metadata has no "
            f"`{METADATA_FORMAT_KEY}` entry."
        )
    if version != SLA_FORMAT_VERSION:
        raise ValueError(
            f"{path} uses SLA weights format {version!r}; this diffusers-sla reads format {SLA_FORMAT_VERSION!r}. "
            "Upgrade diffusers-sla to read it."
        )
    try:
        config_values = json.loads(metadata[METADATA_CONFIG_KEY])
        if isinstance(config_values, dict) and "protect_text" not in config_values:
            # written before text protection existed: those weights were trained and served without it
            config_values = {**config_values, "protect_text": False}
        # A newer diffusers-sla may have added routing fields: drop them with a warning, keep the operator.
        config = SLAConfig.from_dict(config_values, allow_unknown=True)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} has an invalid `{METADATA_CONFIG_KEY}` metadata entry: {err}") from err
    try:
        stored = json.loads(metadata.get(METADATA_LAYER_CONFIGS_KEY, "{}"))
        if not isinstance(stored, dict) or not all(isinstance(v, dict) for v in stored.values()):
            raise TypeError(f"expected a JSON object {{attention path: {{field: value}}}}, got {stored!r:.200}")
        layer_configs = {
            layer_path: SLAConfig.from_dict({**config.to_dict(), **values}, allow_unknown=True)
            for layer_path, values in stored.items()
        }
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} has an invalid `{METADATA_LAYER_CONFIGS_KEY}` metadata entry: {err}") from err
    base_weights = parse_base_weights(path, metadata.get(METADATA_BASE_WEIGHTS_KEY))
    return SLAWeightsFile(path=path, tensors=tensors, config=config, metadata=metadata, layer_configs=layer_configs,
                          base_weights=base_weights)


def parse_base_weights(path: str, text: str | None) -> dict[str, dict[str, Any]]:
    if text is None:
        return {}
    try:
        values = json.loads(text)
    except ValueError:
        values = None
    valid = isinstance(values, dict) and all(
        isinstance(name, str) and os.path.basename(name) == name and isinstance(entry, dict)
        and isinstance(entry.get("size"), int) and isinstance(entry.get("sampled_sha256"), str)
        for name, entry in values.items()
    )
    if not valid:
        raise ValueError(
            f"{path} has an invalid `{METADATA_BASE_WEIGHTS_KEY}` metadata entry: expected a JSON object "
            f'{{"file name": {{"size": int, "sampled_sha256": str}}}}, got {text[:200]!r}.'
        )
    return values


def base_weight_mismatches(weights: SLAWeightsFile) -> list[str]:
    """The base weight files beside `weights.path` that differ from the ones saved with it (files that are not
    there are not checked: SLA weights may travel alone)."""
    folder = os.path.dirname(os.path.abspath(weights.path))
    mismatches = []
    for name, saved in sorted(weights.base_weights.items()):
        full = os.path.join(folder, name)
        if not os.path.isfile(full):
            continue
        found = fingerprint(full)
        if found["size"] != saved["size"]:
            mismatches.append(f"{name} ({found['size']} bytes, saved with {saved['size']})")
        elif found["sampled_sha256"] != saved["sampled_sha256"]:
            mismatches.append(f"{name} (same size, other contents)")
    return mismatches
