# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""What `ModelMixin.save_pretrained` does for a model with SLA layers (`hooks.py` applies the wrapper): the base
weights stay free of SLA keys, `sla_attention.safetensors` is written after them with their fingerprints (also before
`push_to_hub` uploads), and a sidecar left by an earlier save never sits beside new base weights."""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

from torch import nn

from diffusers_sla.config import SLA_MODULE_NAME, SLA_WEIGHTS_NAME
from diffusers_sla.integration.layer import iter_sla_layers

from .format import fingerprint, fsync, write_safetensors
from .io import logger, sla_file_contents


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
        fsync(full)
        written[name] = fingerprint(full)
    return written


def wrap_save_pretrained(original):
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
            tensors, metadata = sla_file_contents(self, _written_base_weights(directory, before))
            filename = os.path.join(directory, SLA_WEIGHTS_NAME)
            write_safetensors(tensors, metadata, filename)
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

    return save_pretrained
