# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Layer selectors (`SLAConfig.dense_layers`, `enable_sla(layer_topk=...)`): block indices and module-path globs."""

from __future__ import annotations

import fnmatch

from torch import nn

from .modules import is_attention_module, join, short


def _block_paths(model: nn.Module) -> list[str]:
    """The model's transformer blocks in module order: the items of its top-level `nn.ModuleList`s named `*blocks`
    (Flux: `transformer_blocks.*` then `single_transformer_blocks.*`)."""
    paths = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList) and name.endswith("blocks"):
            paths += [f"{name}.{index}" for index in range(len(child))]
    return paths


def _glob_matches(pattern: str, path: str) -> bool:
    # a pattern naming a module also names the attention modules below it ("transformer_blocks.0")
    parts = path.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:n]), pattern) for n in range(1, len(parts) + 1))


def select_layers(model: nn.Module, prefix: str, selectors, paths) -> tuple[dict, list]:
    """Match layer selectors (block indices and module-path globs, see `SLAConfig.dense_layers`) against the
    attention module `paths` of `model` (whose paths in a pipeline start with `prefix`). Returns
    `({path: first matching selector}, [selectors matching none of them])`."""
    blocks = _block_paths(model)
    matched, unmatched = {}, []
    for selector in selectors:
        if isinstance(selector, int):
            if not -len(blocks) <= selector < len(blocks):
                unmatched.append(selector)
                continue
            block = blocks[selector]
            hits = [p for p in paths if p == block or p.startswith(block + ".")]
        else:
            hits = [p for p in paths if _glob_matches(selector, p) or _glob_matches(selector, join(prefix, p))]
        if not hits:
            unmatched.append(selector)
        for path in hits:
            matched.setdefault(path, selector)
    return matched, unmatched


def check_selectors(name: str, selectors, targets) -> None:
    """Raise when a layer selector matches no attention module of any of `targets` ((prefix, model) pairs)."""
    if not selectors:
        return
    unmatched = None
    for prefix, model in targets:
        paths = [path for path, m in model.named_modules() if is_attention_module(m)]
        missed = select_layers(model, prefix, selectors, paths)[1]
        unmatched = missed if unmatched is None else [s for s in unmatched if s in missed]
    if unmatched:
        prefix, model = targets[0]
        paths = [join(prefix, p) for p, m in model.named_modules() if is_attention_module(m)]
        raise ValueError(
            f"`{name}`: {unmatched} match no attention module (nothing was changed). Integers are indices of the "
            f"{len(_block_paths(model))} transformer blocks of {type(model).__name__} (negative from the end); "
            f"strings are globs on module paths such as {short(paths, 3)}."
        )

