# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`sla_attention.safetensors`: saving, loading and sharing SLA weights.

Layout of the file (format `SLA_FORMAT_VERSION`):

* one float32 tensor per SLA parameter, named after the attention module's path without the `sla.` part:
  `transformer_blocks.0.attn.proj_l.weight`, `transformer_blocks.0.attn.proj_l.bias`;
* string metadata: `format` (`"pt"`), `diffusers_sla_format` (the format version), `diffusers_sla_version`,
  `sla_config` (the `SLAConfig` as JSON), `head_dims` (JSON `{attention path: head_dim}`), `model_class`, and
  `sla_layer_configs` (JSON `{attention path: operator fields}`) only for layers whose operator differs from
  `sla_config`, and, when `save_pretrained` wrote it, `base_weights` (JSON `{file name: {"size", "sampled_sha256"}}`
  of the base weight files written by the same save), so that SLA weights found beside other base weights (an
  interrupted save, a copied file) are detected on load.

The file lives beside the transformer's own weights. Importing this module hooks `ModelMixin.save_pretrained` (so
`save_pretrained`, `pipe.save_pretrained` and `push_to_hub` write the file, and the base weights stay free of SLA
keys) and `ModelMixin.from_pretrained` (to remember the subfolder and revision a model came from, so `enable_sla` can
replay the file from there).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import shlex
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import SLAConfig
from .constants import SLA_FORMAT_VERSION, SLA_MODULE_NAME, SLA_WEIGHTS_NAME
from .layer import SparseLinearAttention, iter_sla_layers

logger = logging.getLogger(__name__)

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
_FINGERPRINT_CHUNKS = 16
_FINGERPRINT_CHUNK_BYTES = 64 * 1024

# Attribute set on models by the `from_pretrained` hook: where the model was loaded from.
_LOAD_SOURCE_ATTR = "_sla_load_source"
# Set on each attention module by the same hook: `(load source, path in the model)`.
MODULE_ORIGIN_ATTR = "_sla_module_origin"
# Set on throw-away skeletons (converters) so that `on_sla_enabled` does not try to replay anything into them.
_NO_REPLAY_ATTR = "_sla_no_replay"
# Set on SLA layers once loaded (or once the replay found nothing to load).
_REPLAYED_ATTR = "_sla_replayed"
_ZERO_INIT_NOTE = "SLA starts from zero-initialised projections (`proj_l`), as if it had never been trained"


# ===== Names =====


def sla_entry_names(path: str, layer: SparseLinearAttention | None = None) -> list[str]:
    """File entries of the SLA layer held by the attention module at `path` (`""` for the model itself): `proj_l`'s,
    and with `layer` also those of its fusion's parameters."""
    prefix = f"{path}." if path else ""
    names = SparseLinearAttention.sla_parameter_names if layer is None else layer.sla_parameter_names
    return [prefix + name for name in names]


def get_sla_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{entry name: tensor}` of every SLA parameter of `model`, named as in `sla_attention.safetensors`."""
    state = {}
    for path, _, layer in iter_sla_layers(model):
        params = layer.sla_parameters()
        for entry, name in zip(sla_entry_names(path, layer), layer.sla_parameter_names):
            state[entry] = params[name]
    return state


def _is_pipeline(obj: Any) -> bool:
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "components", None), dict)


def _sla_components(obj: Any) -> list[tuple[str, nn.Module]]:
    """`[(subfolder, model)]` for every model of `obj` holding SLA layers: the model itself (subfolder `""`), or the
    pipeline components (subfolder = component name, the layout of `pipe.save_pretrained`)."""
    if _is_pipeline(obj):
        return [
            (name, comp)
            for name, comp in obj.components.items()
            if isinstance(comp, nn.Module) and next(iter_sla_layers(comp), None) is not None
        ]
    if isinstance(obj, nn.Module):
        return [("", obj)] if next(iter_sla_layers(obj), None) is not None else []
    raise TypeError(f"Expected a diffusers pipeline or a torch model, got {type(obj).__name__}.")


def _short_list(items, limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    return f"[{shown}{f', ... and {len(items) - limit} more' if len(items) > limit else ''}]"


# ===== Saving =====


def _sla_file_contents(
    model: nn.Module, base_weights: dict[str, dict] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from . import __version__

    layers = list(iter_sla_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SLA layers to save: call `enable_sla` first.")
    # Own, contiguous CPU copies: safetensors refuses shared or non-contiguous storage.
    tensors = {
        key: value.detach().to("cpu", torch.float32).contiguous().clone()
        for key, value in get_sla_state_dict(model).items()
    }
    # the operator most layers run is the file's config; the others are listed per layer
    counts = Counter(json.dumps(layer.config.operator_dict(), sort_keys=True) for _, _, layer in layers)
    most = counts.most_common(1)[0][0]
    common = next(layer.config for _, _, layer in layers
                  if json.dumps(layer.config.operator_dict(), sort_keys=True) == most)
    layer_configs = {
        path: layer.config.operator_dict() for path, _, layer in layers if layer.config.operator_differences(common)
    }
    metadata = {
        "format": "pt",
        METADATA_FORMAT_KEY: SLA_FORMAT_VERSION,
        METADATA_VERSION_KEY: __version__,
        METADATA_CONFIG_KEY: json.dumps(common.to_dict(), sort_keys=True),
        METADATA_HEAD_DIMS_KEY: json.dumps({path: layer.head_dim for path, _, layer in layers}),
        METADATA_MODEL_CLASS_KEY: type(model).__name__,
    }
    if layer_configs:
        metadata[METADATA_LAYER_CONFIGS_KEY] = json.dumps(layer_configs, sort_keys=True)
    if base_weights:
        metadata[METADATA_BASE_WEIGHTS_KEY] = json.dumps(base_weights, sort_keys=True)
    return tensors, metadata


def _fsync(path: str) -> None:
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


def _fingerprint(path: str) -> dict[str, Any]:
    """`{"size", "sampled_sha256"}` of a file: its size, and the SHA-256 of `_FINGERPRINT_CHUNKS` evenly spaced
    chunks."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= _FINGERPRINT_CHUNKS * _FINGERPRINT_CHUNK_BYTES:
            digest.update(handle.read())
        else:
            step = (size - _FINGERPRINT_CHUNK_BYTES) // (_FINGERPRINT_CHUNKS - 1)
            for index in range(_FINGERPRINT_CHUNKS):
                handle.seek(index * step)
                digest.update(handle.read(_FINGERPRINT_CHUNK_BYTES))
    return {"size": size, "sampled_sha256": digest.hexdigest()}


def _write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], filename: str) -> None:
    # Write beside the target and rename: an interrupted save never leaves a truncated file under the real name.
    directory = os.path.dirname(os.path.abspath(filename))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sla_attention.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        _fsync(tmp)  # the data is on disk before the rename makes it visible under the real name
        os.replace(tmp, filename)
        _fsync(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_sla(
    model_or_pipe: Any,
    save_directory: str | os.PathLike,
    *,
    is_main_process: bool = True,
    weight_name: str = SLA_WEIGHTS_NAME,
) -> list[str]:
    """Write the SLA weights of a model (to `save_directory/sla_attention.safetensors`) or of a pipeline (each
    SLA-enabled component to `save_directory/<component>/sla_attention.safetensors`). Only the main process writes.

    `save_pretrained` and `push_to_hub` already call this for every model with SLA layers; call it yourself to save
    the SLA weights alone (a few hundred KB) next to an unchanged base model.

    Returns the paths of the files (written or, off the main process, that the main process writes).
    """
    targets = _sla_components(model_or_pipe)
    if not targets:
        raise ValueError(f"{type(model_or_pipe).__name__} has no SLA layers to save: call `enable_sla` first.")
    paths = []
    for subfolder, model in targets:
        filename = os.path.join(os.fspath(save_directory), subfolder, weight_name)
        if is_main_process:
            tensors, metadata = _sla_file_contents(model)
            _write_safetensors(tensors, metadata, filename)
            layers = sum(name.endswith("proj_l.weight") for name in tensors)
            logger.info(f"Saved SLA weights of {layers} layers to {filename}.")
        paths.append(filename)
    return paths


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
    base_weights = _parse_base_weights(path, metadata.get(METADATA_BASE_WEIGHTS_KEY))
    return SLAWeightsFile(path=path, tensors=tensors, config=config, metadata=metadata, layer_configs=layer_configs,
                          base_weights=base_weights)


def _parse_base_weights(path: str, text: str | None) -> dict[str, dict[str, Any]]:
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


def _base_weight_mismatches(weights: SLAWeightsFile) -> list[str]:
    """The base weight files beside `weights.path` that differ from the ones saved with it (files that are not
    there are not checked: SLA weights may travel alone)."""
    folder = os.path.dirname(os.path.abspath(weights.path))
    mismatches = []
    for name, saved in sorted(weights.base_weights.items()):
        full = os.path.join(folder, name)
        if not os.path.isfile(full):
            continue
        found = _fingerprint(full)
        if found["size"] != saved["size"]:
            mismatches.append(f"{name} ({found['size']} bytes, saved with {saved['size']})")
        elif found["sampled_sha256"] != saved["sampled_sha256"]:
            mismatches.append(f"{name} (same size, other contents)")
    return mismatches


class SLALoadResult(NamedTuple):
    """What `load_sla` / the replay in `enable_sla` did for one model."""

    source: str
    loaded_layers: list[str]
    missing_layers: list[str]
    unexpected_keys: list[str]
    # `{field: (installed value, file value)}` over all loaded layers; empty unless `strict=False` let it pass.
    config_differences: dict[str, tuple[Any, Any]]
    # Layers that took the operator config the file stores for them alone (`_layer_configs_to_adopt`).
    layer_configs: dict[str, SLAConfig] = {}


def _plan_load(model: nn.Module, weights: SLAWeightsFile, strict: bool):
    """Check `weights` against the SLA layers of `model` without touching it. Returns the `(parameter, tensor)` pairs
    to copy and the `SLALoadResult`; raises `ValueError` listing every problem."""
    from .processor import operator_differences_for

    layers = {path: layer for path, _, layer in iter_sla_layers(model)}
    modules = {path: attn for path, attn, _ in iter_sla_layers(model)}
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no SLA layers: call `enable_sla` before loading SLA weights into it."
        )
    params = {}
    for path, layer in layers.items():
        named = layer.sla_parameters()
        for entry, name in zip(sla_entry_names(path, layer), layer.sla_parameter_names):
            params[entry] = (path, named[name])

    file_keys = set(weights.tensors)
    missing_keys = sorted(set(params) - file_keys)
    # entries of layers the config keeps dense (`dense_layers`) are expected: they are simply not used
    dense_entries = {name for path, module in model.named_modules() if module.__dict__.get("_sla_dense_layer")
                     and path not in layers for name in sla_entry_names(path)}
    unexpected = sorted(file_keys - set(params) - dense_entries)
    missing_layers = sorted({params[k][0] for k in missing_keys})
    common = [k for k in params if k in file_keys]

    errors, soft = [], []
    dtypes = [f"{k} ({weights.tensors[k].dtype})" for k in common if weights.tensors[k].dtype != torch.float32]
    if dtypes:
        errors.append(f"SLA weights must be float32, found {_short_list(dtypes)}")
    shapes = [
        f"{k}: file {tuple(weights.tensors[k].shape)}, model {tuple(params[k][1].shape)}"
        for k in common
        if tuple(weights.tensors[k].shape) != tuple(params[k][1].shape)
    ]
    if shapes:
        errors.append(f"shape mismatch for {_short_list(shapes)}")
    # NaN or inf in proj_l turns every output of the model into NaN
    non_finite = [k for k in common if weights.tensors[k].is_floating_point()
                  and not weights.tensors[k].isfinite().all()]
    if non_finite:
        errors.append(f"values that are not finite (NaN or inf) in {_short_list(non_finite)}")
    if missing_layers:
        soft.append(f"missing layers (in the model, not in the file): {_short_list(missing_layers)}")
    if unexpected:
        soft.append(f"extra entries (in the file, no such SLA layer in the model): {_short_list(unexpected)}")
    if not common:
        errors.append("no SLA layer of the model is in the file")
    mismatches = _base_weight_mismatches(weights)
    if mismatches:
        soft.append(
            f"the base weights beside it are not the ones these SLA weights were saved with: {_short_list(mismatches)}"
            " (an interrupted `save_pretrained`, or SLA weights copied from another save)"
        )

    adopt = _layer_configs_to_adopt(layers, weights)
    differences: dict[str, tuple[Any, Any]] = {}
    by_layer: dict[str, tuple[SLAConfig, dict]] = {}
    for path in sorted({params[k][0] for k in common}):
        installed = adopt.get(path, layers[path].config)
        layer_differences = operator_differences_for(modules[path], installed, weights.config_for(path))
        if layer_differences:
            by_layer[path] = (installed, layer_differences)
        for name, values in layer_differences.items():
            differences.setdefault(name, values)
    if by_layer:
        soft.append(_config_mismatch_message(by_layer, weights, len(set(params[k][0] for k in common))))

    if strict:
        errors += soft
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        # Only layer-set and config problems can be waived.
        fix = "\nPass `strict=False` to load anyway (these problems then become warnings)." if strict and soft else ""
        raise ValueError(f"Cannot load SLA weights from {weights.path} (the model was left unchanged):\n{lines}{fix}")
    for message in soft:
        warnings.warn(f"Loading SLA weights from {weights.path} with strict=False: {message}.", stacklevel=3)

    pairs = [(params[k][1], weights.tensors[k]) for k in common]
    result_layers = {params[k][0] for k in common}
    result = SLALoadResult(
        source=weights.path,
        loaded_layers=sorted({params[k][0] for k in common}),
        missing_layers=missing_layers,
        unexpected_keys=unexpected,
        config_differences=differences,
        layer_configs={path: config for path, config in adopt.items() if path in result_layers},
    )
    return pairs, result


def _fields(differences: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"`{n}` (installed {a!r}, file {b!r})" for n, (a, b) in differences.items())


def _config_mismatch_message(by_layer: dict[str, tuple[SLAConfig, dict]], weights: SLAWeightsFile, loaded: int) -> str:
    head = "the SLA config differs from the one the weights were trained with"
    groups: dict[str, list[str]] = {}
    for path, (_, layer_differences) in by_layer.items():
        groups.setdefault(_fields(layer_differences), []).append(path)
    if len(groups) == 1 and len(by_layer) == loaded:
        return f"{head}: {next(iter(groups))}"  # one difference for every layer: the whole config
    lines = []
    for fields, paths in groups.items():
        installed = by_layer[paths[0]][0].operator_dict()
        stored = weights.config_for(paths[0]).operator_dict()
        lines.append(f"layers {_short_list(paths)}: {fields}; installed {installed}, file {stored}")
    return head + ", per layer:\n    " + "\n    ".join(lines)


def _layer_configs_to_adopt(layers: dict[str, SparseLinearAttention], weights: SLAWeightsFile) -> dict[str, SLAConfig]:
    """`{path: config}` for the layers the file gives an operator of their own (a module given its own processor
    when saved), when every other layer runs the file's common operator, so that the installed config came from the
    file or agrees with it: those layers take their stored operator, with the routing fields they have."""
    if not weights.layer_configs:
        return {}
    others = [layer for path, layer in layers.items() if path not in weights.layer_configs]
    if any(layer.config.operator_differences(weights.config) for layer in others):
        return {}
    return {
        path: dataclasses.replace(layers[path].config, **stored.operator_dict())
        for path, stored in weights.layer_configs.items()
        if path in layers and layers[path].config.operator_differences(stored)
    }


def _apply_plan(model: nn.Module, pairs, layer_configs: dict[str, SLAConfig] | None = None) -> None:
    if layer_configs:
        _adopt_layer_configs(model, layer_configs)
    with torch.no_grad():
        for param, tensor in pairs:
            param.copy_(tensor)
    _mark_replayed(model)


def _adopt_layer_configs(model: nn.Module, layer_configs: dict[str, SLAConfig]) -> None:
    # A module whose SLA layer runs a config of its own needs a processor of its own: the shared one hands its
    # config to every layer it runs.
    from .processor import SLAAttnProcessor

    for path, attn, layer in iter_sla_layers(model):
        config = layer_configs.get(path)
        if config is None:
            continue
        current = getattr(attn, "processor", None)
        if isinstance(current, SLAAttnProcessor):
            own = SLAAttnProcessor(config, backend=current.backend)
            if current._attention_backend is not None:
                own._attention_backend = current._attention_backend
            attn.set_processor(own)
        layer.config = config
        logger.info(f"SLA layer {path} runs the config stored for it: {config.operator_dict()}.")


def _mark_replayed(model: nn.Module) -> None:
    # Loaded layers hold trained weights: a later enable_sla must not replay the file over them.
    for _, _, layer in iter_sla_layers(model):
        setattr(layer, _REPLAYED_ATTR, True)


def load_sla_state_dict(
    model: nn.Module, weights: SLAWeightsFile | str | os.PathLike, *, strict: bool = True
) -> SLALoadResult:
    """Load an `SLAWeightsFile` (or the path of an `sla_attention.safetensors` file) into the SLA layers of `model`,
    all or nothing."""
    if not isinstance(weights, SLAWeightsFile):
        weights = read_sla_file(weights)
    pairs, result = _plan_load(model, weights, strict)
    _apply_plan(model, pairs, result.layer_configs)
    return result


# ===== Locating files: local folder, Hugging Face cache, Hub =====


def _parse_hf_cache_path(directory: str) -> tuple[str, str, str, str] | None:
    """`(cache_dir, repo_id, commit, subfolder)` when `directory` lies in a Hugging Face cache snapshot
    (`<cache>/models--org--name/snapshots/<commit>/<subfolder>`), where pipelines load their components from."""
    parts = os.path.abspath(directory).split(os.sep)
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            repo_id = parts[i][len("models--"):].replace("--", "/", 1)
            return os.sep.join(parts[:i]) or os.sep, repo_id, parts[i + 2], "/".join(parts[i + 3:])
    return None


# Names ending like this are files, never Hub repo ids (repo names may hold dots: "FLUX.1-dev").
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".json", ".gguf")


def _local_path_reason(text: str, guess: bool = True) -> str | None:
    """Why `text`, which does not exist, is a local path and not a Hub repo id (`"user/name"`), or None: a
    typo'd file name must fail at once, not after a wait for the Hub. `guess=False` keeps to the path forms no repo
    id can have (for names diffusers already resolved)."""
    if os.path.isabs(text) or text.startswith(("./", "../", "~")):
        return "it is an absolute or relative path"
    if text.count("/") > 1 or "\\" in text or (os.sep != "/" and os.sep in text):
        return "it has more path separators than a repo id"
    if not guess:
        return None
    if text.lower().endswith(_FILE_SUFFIXES):
        return "it ends with a file extension"
    head = text.split("/", 1)[0]
    if "/" in text and head and os.path.isdir(head):
        return f"a local folder {head!r} exists"
    return None


def _hub_download(repo_id: str, filename: str, subfolder: str | None, **hub_kwargs) -> tuple[str | None, str]:
    """Download (or find in the cache) `filename`; `(None, why)` when the repo has no such file."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    path_in_repo = f"{subfolder + '/' if subfolder else ''}{filename}"
    where = f"{repo_id}/{path_in_repo} on the Hugging Face Hub"
    try:
        return hf_hub_download(repo_id=repo_id, filename=filename, subfolder=subfolder or None, **hub_kwargs), where
    except LocalEntryNotFoundError:
        # Not in the cache, and the Hub was not asked or did not answer: say how to fetch it, not just "not found".
        if hub_kwargs.get("local_files_only"):
            reason = "`local_files_only=True`"
        elif constants.HF_HUB_OFFLINE:
            reason = "offline mode is on (HF_HUB_OFFLINE)"
        else:
            reason = "the Hub could not be reached"
        command = f"hf download {repo_id} {path_in_repo}"
        if hub_kwargs.get("revision"):
            command += f" --revision {hub_kwargs['revision']}"
        cache_dir = hub_kwargs.get("cache_dir")
        if cache_dir and os.path.abspath(os.fspath(cache_dir)) != os.path.abspath(constants.HF_HUB_CACHE):
            command += f" --cache-dir {shlex.quote(os.fspath(cache_dir))}"
        return None, (f"{where} (not in the local cache, and {reason}; `{command}` fetches it, then `load_sla` "
                      "loads it)")
    except EntryNotFoundError:
        return None, where


def resolve_sla_file(
    path_or_repo_id: str | os.PathLike,
    subfolder: str | None = None,
    *,
    weight_name: str = SLA_WEIGHTS_NAME,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    guess_local_paths: bool = True,
) -> tuple[str | None, str]:
    """Find `weight_name`: a file path, a local folder (then `subfolder`), a folder of a Hugging Face cache snapshot
    (fetched from its repo when the snapshot lacks it) or a Hub repo id (`huggingface_hub.hf_hub_download`, which
    uses the cache when offline). Returns `(local path or None when there is no such file, a description of where
    it was looked for)`. A local folder that does not exist and Hub errors other than "no such file" raise.

    A name that does not exist but looks like a local path raises `FileNotFoundError` at once: a path form no repo
    id has, and, with `guess_local_paths` (user input), a file extension or a first component that is a local
    folder. The replay passes `False`: there the name is one `from_pretrained` already resolved."""
    text = os.fspath(path_or_repo_id)
    if os.path.isfile(text):
        if subfolder:
            raise ValueError(f"`subfolder` was given but {text} is a file.")
        return text, text
    hub_kwargs = {"revision": revision, "cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
    if os.path.isdir(text):
        candidate = os.path.join(text, subfolder or "", weight_name)
        if os.path.isfile(candidate):
            return candidate, candidate
        snapshot = _parse_hf_cache_path(os.path.join(text, subfolder or ""))
        if snapshot is not None:
            # Pipelines download only the files diffusers needs: the SLA file lives in the same repo and commit.
            cache_root, repo_id, commit, sub = snapshot
            hub_kwargs.update(revision=commit, cache_dir=cache_root)
            return _hub_download(repo_id, weight_name, sub, **hub_kwargs)
        return None, candidate
    reason = _local_path_reason(text, guess_local_paths)
    if reason is not None:
        raise FileNotFoundError(
            f"No such file or directory: {text!r} (taken for a local path, not a Hub repo id, because {reason}; "
            f"looking for SLA weights `{weight_name}`)."
        )
    return _hub_download(text, weight_name, subfolder, **hub_kwargs)


def _all_zero(model: nn.Module) -> bool:
    return all(not t.detach().any() for t in get_sla_state_dict(model).values())


def _missing_file_warning(model: nn.Module, where: str, stacklevel: int) -> None:
    if _all_zero(model):
        state = _ZERO_INIT_NOTE
    else:
        state = "the SLA layers keep their current weights"
    warnings.warn(f"No SLA weights found at {where}: {state}.", UserWarning, stacklevel=stacklevel)


# ===== Loading =====


def load_sla(
    pipe_or_model: Any,
    path_or_repo_id: str | os.PathLike,
    subfolder: str | None = None,
    *,
    strict: bool = True,
    weight_name: str = SLA_WEIGHTS_NAME,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> list[SLALoadResult]:
    """Load `sla_attention.safetensors` into the SLA layers of a model or pipeline (SLA must be enabled first).

    Args:
        pipe_or_model: a diffusers model, or a pipeline: each SLA-enabled component (usually `transformer`) reads the
            file of its own subfolder (`<component>/sla_attention.safetensors`, as `pipe.save_pretrained` writes it)
            unless `subfolder` or a file path is given.
        path_or_repo_id (`str` or `os.PathLike`): the file itself, a local folder, or a Hub repo id (`"user/repo"`,
            fetched with `huggingface_hub`, from the local cache when offline).
        subfolder (`str`, *optional*): folder of the file inside `path_or_repo_id` (`"transformer"` for a pipeline
            repo loaded into a bare transformer).
        strict (`bool`, *optional*, defaults to `True`): when `False`, missing or extra layers and a config that
            differs from the installed one are warnings (the layers present in both are loaded) instead of errors.
            Wrong shapes, non-float32 tensors and damaged files are always errors.
        revision, cache_dir, token, local_files_only: passed to `huggingface_hub.hf_hub_download`.

    Every file is checked before any weight is copied: on error the model is left unchanged. A file that does not
    exist is a warning (the SLA layers keep their weights). Returns one `SLALoadResult` per model loaded.
    """
    targets = _sla_components(pipe_or_model)
    if not targets:
        raise ValueError(
            f"{type(pipe_or_model).__name__} has no SLA layers: call `enable_sla` before `load_sla` "
            "(`enable_sla` on a model loaded with `from_pretrained` already loads the SLA weights saved beside it)."
        )
    text = os.fspath(path_or_repo_id)
    is_pipe = _is_pipeline(pipe_or_model)
    if is_pipe and (subfolder is not None or os.path.isfile(text)) and len(targets) > 1:
        names = [name for name, _ in targets]
        raise ValueError(
            f"The pipeline has several SLA-enabled components {names}: one file cannot fill them all. Pass no "
            "`subfolder` to load each from its own subfolder, or call `load_sla` on one component."
        )
    hub_kwargs = {
        "weight_name": weight_name, "revision": revision, "cache_dir": cache_dir, "token": token,
        "local_files_only": local_files_only,
    }
    plans = []
    for component, model in targets:
        sub = subfolder if (subfolder is not None or not is_pipe or os.path.isfile(text)) else component
        filename, where = resolve_sla_file(text, sub, **hub_kwargs)
        if filename is None:
            hint = ""
            if not is_pipe and not subfolder and os.path.isfile(os.path.join(text, "transformer", weight_name)):
                hint = " (there is one in its `transformer` subfolder: pass `subfolder='transformer'`)"
            _missing_file_warning(model, where + hint, stacklevel=3)
            continue
        weights = read_sla_file(filename)
        plans.append((model, *_plan_load(model, weights, strict)))
    # Everything was checked: now copy.
    results = []
    for model, pairs, result in plans:
        _apply_plan(model, pairs, result.layer_configs)
        logger.info(f"Loaded SLA weights of {len(result.loaded_layers)} layers from {result.source}.")
        results.append(result)
    return results


def _load_location(model: nn.Module) -> dict[str, Any] | None:
    source = getattr(model, _LOAD_SOURCE_ATTR, None)
    if source is not None:
        return source
    config = getattr(model, "config", None)
    name = config.get("_name_or_path") if hasattr(config, "get") else None
    return {"path": name} if name else None


def _on_meta_device(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def on_sla_enabled(model_or_pipe: Any, *, strict: bool = True) -> list[SLALoadResult]:
    """Replay rule, called by `enable_sla` once SLA layers are installed.

    For each model with SLA layers (the model, or each SLA-enabled pipeline component), look where the model was
    loaded from (`from_pretrained`'s path or repo id, subfolder and revision; for pipeline components, the folder of
    the component, which for a Hub pipeline is a cache snapshot and leads back to the repo): if
    `sla_attention.safetensors` is there, load it (same checks as `load_sla`) and say so with a warning-level log
    line. If the model has a load location but no SLA file, warn that SLA starts from zero-initialised projections.
    Models built from a config have no load location: nothing happens.
    """
    results = []
    for _, model in _sla_components(model_or_pipe):
        if getattr(model, _NO_REPLAY_ATTR, False) or _on_meta_device(model):
            continue
        layers = [layer for _, _, layer in iter_sla_layers(model)]
        fresh = [layer for layer in layers if not getattr(layer, _REPLAYED_ATTR, False)]
        if len(fresh) < len(layers):
            # Calling enable_sla again (new config, re-attached layers) must not overwrite trained weights with
            # the file: replay only into a model whose SLA layers are all new.
            if fresh:
                logger.info(f"{len(fresh)} new SLA layers of {type(model).__name__} start from zero (no replay).")
            _mark_replayed(model)
            continue
        location = _load_location(model)
        if location is None or not location.get("path"):
            logger.info(f"{type(model).__name__} was not loaded from a folder or repo: no SLA weights to replay.")
            _mark_replayed(model)
            continue
        try:
            filename, where = resolve_sla_file(
                location["path"],
                location.get("subfolder"),
                revision=location.get("revision"),
                cache_dir=location.get("cache_dir"),
                local_files_only=bool(location.get("local_files_only")),
                guess_local_paths=False,
            )
        except (OSError, ValueError) as err:
            # A network or auth failure must not make enable_sla fail; the user can still call load_sla.
            warnings.warn(
                f"Could not look for SLA weights beside {location['path']!r} ({err}); {_ZERO_INIT_NOTE}. Call "
                "`load_sla(model, path_or_repo_id)` to load them explicitly.",
                UserWarning,
                stacklevel=3,
            )
            _mark_replayed(model)
            continue
        if filename is None:
            _missing_file_warning(model, where, stacklevel=3)
            _mark_replayed(model)
            continue
        result = load_sla_state_dict(model, filename, strict=strict)
        logger.warning(
            f"diffusers-sla: loaded trained SLA weights of {len(result.loaded_layers)} layers of "
            f"{type(model).__name__} from {filename}."
        )
        results.append(result)
    return results


def on_sla_disabled(model_or_pipe: Any) -> None:
    """Called by `disable_sla` after the SLA layers were removed. Nothing is cached per model today; the hook exists
    so that the processor does not change when something is."""


def peek_sla_config(
    path_or_repo_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs
) -> SLAConfig | None:
    """The `SLAConfig` stored in the SLA weights at `path_or_repo_id` (see `resolve_sla_file`), or `None` when there
    is no such file. Lets `enable_sla` default to the config the weights were trained with."""
    filename, _ = resolve_sla_file(path_or_repo_id, subfolder, **hub_kwargs)
    return None if filename is None else read_sla_file(filename).config


def sla_config_at_load_location(model: nn.Module) -> SLAConfig | None:
    """The `SLAConfig` of the SLA weights that `on_sla_enabled` would replay into `model`, or `None`. Never raises
    for a missing file or an unreachable Hub."""
    location = _load_location(model)
    if location is None or not location.get("path"):
        return None
    try:
        return peek_sla_config(
            location["path"], location.get("subfolder"), revision=location.get("revision"),
            cache_dir=location.get("cache_dir"), local_files_only=bool(location.get("local_files_only")),
            guess_local_paths=False,
        )
    except (OSError, ValueError):
        return None


# ===== Hooks on diffusers' ModelMixin =====


def _strip_sla_keys_hook(module, state_dict, prefix, local_metadata):
    # Registered on each SLA-enabled attention module for the duration of a save: its `sla.` entries leave the
    # state dict, whatever the nesting prefix.
    sla_prefix = f"{prefix}{SLA_MODULE_NAME}."
    for key in [k for k in state_dict if k.startswith(sla_prefix)]:
        del state_dict[key]


def _remove_stale_sidecar(directory: str, model: nn.Module, *, has_sla: bool) -> None:
    filename = os.path.join(directory, SLA_WEIGHTS_NAME)
    if not os.path.isfile(filename):
        return
    os.remove(filename)
    if has_sla:
        logger.info(f"Removed the previous {filename}; the SLA weights are written again after the base weights.")
    else:
        logger.warning(
            f"diffusers-sla: removed {filename}: {type(model).__name__} has no SLA layers now, so the SLA weights "
            "there were from an earlier save and would not match the base weights saved now."
        )


def _file_states(directory: str) -> dict[str, tuple[int, int, int]]:
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return {}
    states = {}
    for entry in entries:
        if entry.is_file():
            stat = entry.stat()
            states[entry.name] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return states


def _written_base_weights(directory: str, before: dict[str, tuple[int, int, int]]) -> dict[str, dict[str, Any]]:
    """Fingerprints of the weight files a save just wrote in `directory` (new or changed since `before`), each
    synced to disk first: the SLA file that names them must not reach the disk before they do."""
    written = {}
    for name, state in sorted(_file_states(directory).items()):
        if name in (SLA_WEIGHTS_NAME, "config.json", "README.md") or name.startswith(".") or before.get(name) == state:
            continue
        full = os.path.join(directory, name)
        _fsync(full)
        written[name] = _fingerprint(full)
    return written


def _wrap_save_pretrained(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if os.path.isfile(os.fspath(save_directory)):
            return original(self, save_directory, *args, **kwargs)
        layers = list(iter_sla_layers(self))
        bound = signature.bind(self, save_directory, *args, **kwargs)
        is_main_process = bound.arguments.get("is_main_process", True)
        directory = os.fspath(save_directory)
        if is_main_process:
            # A sidecar left by an earlier save must never sit beside these new base weights.
            _remove_stale_sidecar(directory, self, has_sla=bool(layers))
        if not layers:
            return original(self, save_directory, *args, **kwargs)
        before = _file_states(directory)
        written = []

        def write_sidecar():
            # After the base weights, so that an interrupted save never pairs new SLA weights with old base weights.
            if written or not is_main_process:
                return
            tensors, metadata = _sla_file_contents(self, _written_base_weights(directory, before))
            filename = os.path.join(directory, SLA_WEIGHTS_NAME)
            _write_safetensors(tensors, metadata, filename)
            written.append(filename)
            logger.info(f"Saved SLA weights of {len(tensors) // 2} layers to {filename}.")

        def upload_folder(*upload_args, **upload_kwargs):
            # `save_pretrained(push_to_hub=True)` uploads from inside the save, once the base weights are written.
            write_sidecar()
            return type(self)._upload_folder(self, *upload_args, **upload_kwargs)

        handles = [attn.register_state_dict_post_hook(_strip_sla_keys_hook) for _, attn, _ in layers]
        self.__dict__["_upload_folder"] = upload_folder
        try:
            result = original(self, save_directory, *args, **kwargs)
        finally:
            self.__dict__.pop("_upload_folder", None)
            for handle in handles:
                handle.remove()
        write_sidecar()
        return result

    save_pretrained._diffusers_sla_hook = True
    return save_pretrained


def _wrap_from_pretrained(original):
    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path=None, **kwargs):
        model = original(cls, pretrained_model_name_or_path, **kwargs)
        # diffusers records only the path or repo id (`config._name_or_path`): keep what is needed to find the
        # SLA file beside the weights again (never the token).
        if isinstance(model, nn.Module) and pretrained_model_name_or_path is not None:
            source = {
                "path": os.fspath(pretrained_model_name_or_path),
                "subfolder": kwargs.get("subfolder"),
                "revision": kwargs.get("revision"),
                "cache_dir": os.fspath(kwargs["cache_dir"]) if kwargs.get("cache_dir") else None,
                "local_files_only": kwargs.get("local_files_only"),
            }
            setattr(model, _LOAD_SOURCE_ATTR, source)
            for path, module in model.named_modules():  # for the per-module `set_processor` install's replay
                if hasattr(module, "set_processor"):
                    module.__dict__[MODULE_ORIGIN_ATTR] = (source, path)
        return model

    from_pretrained._diffusers_sla_hook = True
    return classmethod(from_pretrained)


def install_hooks() -> None:
    """Wrap `diffusers.ModelMixin.save_pretrained` and `from_pretrained` once (idempotent; done at import)."""
    from diffusers import ModelMixin

    if not getattr(ModelMixin.save_pretrained, "_diffusers_sla_hook", False):
        ModelMixin.save_pretrained = _wrap_save_pretrained(ModelMixin.save_pretrained)
    current = ModelMixin.__dict__["from_pretrained"]
    if not getattr(current.__func__, "_diffusers_sla_hook", False):
        ModelMixin.from_pretrained = _wrap_from_pretrained(current.__func__)


install_hooks()

__all__ = [
    "SLALoadResult",
    "SLAWeightsFile",
    "get_sla_state_dict",
    "load_sla",
    "load_sla_state_dict",
    "on_sla_disabled",
    "on_sla_enabled",
    "peek_sla_config",
    "read_sla_file",
    "resolve_sla_file",
    "save_sla",
    "sla_config_at_load_location",
    "sla_entry_names",
]
