# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`SLAConfig`: every knob of Sparse-Linear Attention in one dataclass.

The config has two groups of fields:

* the *operator* (`topk`, `blkq`, `blkk`, `feature_map`, `tie_feature_map_qk`, `linear_scope`, `protect_text`,
  `fusion`): what SLA computes.
  A backbone fine-tuned with SLA must be served with the same operator fields, so these are stored in
  `sla_attention.safetensors` and compared on load.
* the *routing policy* (`cross_attention`, `masked_attention`, `min_kv_blocks`, `dense_layers`): which attention
  calls of a diffusers model the processor sends to SLA and which it leaves dense. See
  `diffusers_sla/integration/routing.py`.

It is also the one home of the constants the other modules share (file name, format version, allowed values).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

# (set by the package's __init__ before it imports any of its modules)
from . import __version__

# The file that carries SLA weights beside a transformer's own weights.
SLA_WEIGHTS_NAME = "sla_attention.safetensors"
# Bumped whenever the layout of SLA_WEIGHTS_NAME changes incompatibly.
SLA_FORMAT_VERSION = "1"
# Attribute under which each SLA-enabled attention module holds its own `SparseLinearAttention`.
SLA_MODULE_NAME = "sla"

ALLOWED_BLOCK_SIZES = (32, 64, 128)
# Added to the linear branch's denominator (every backend): keeps rows whose features are all zero (possible with
# relu) at 0 instead of NaN, and the linear branch at 0 when no key block is left for it.
LINEAR_EPS = 1e-5
ALLOWED_FEATURE_MAPS = ("softmax", "elu", "relu")
ALLOWED_LINEAR_SCOPES = ("rest", "all", "none")
ALLOWED_ROUTES = ("sla", "dense")
ALLOWED_FUSIONS = ("sla", "mass", "ratio")

# Fields that change what the operator computes; the rest only decide which calls use it.
OPERATOR_FIELDS = ("topk", "blkq", "blkk", "feature_map", "tie_feature_map_qk", "linear_scope", "protect_text",
                   "fusion")


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds; anything else unchanged."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def _whole_number(value: Any) -> int | None:
    """An integer (Python or numpy, or a float with no fractional part, as JSON writers produce) as an `int`; None
    for anything else, booleans included."""
    value = _plain(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def layer_selectors(name: str, value: Any) -> tuple:
    """A list of layer selectors (block indices and module-path globs) as a tuple of `int` and `str`."""
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]  # one selector given alone
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"`{name}` must be a list of block indices (int) and module-path globs (str), got {value!r}.")
    selectors = []
    for item in value:
        index = _whole_number(item)
        if index is not None:
            selectors.append(index)
        elif isinstance(item, str) and item.strip():
            selectors.append(item.strip())
        else:
            raise ValueError(
                f"`{name}` entries must be block indices (int) or non-empty module-path globs (str), got {item!r}."
            )
    return tuple(selectors)


@dataclass(frozen=True)
class SLAConfig:
    """Configuration of Sparse-Linear Attention.

    Immutable: every value is checked once, when the config is built, so derive a changed config with
    `dataclasses.replace(config, topk=0.1)` (checked again) instead of assigning to a field.

    Args:
        topk (`float`, *optional*, defaults to `0.2`):
            Fraction of key blocks each query block attends to exactly (the "critical" blocks), in (0, 1]. The number
            of kept blocks is `int(topk * n_key_blocks)`, at least 1 and at most all blocks.
        blkq (`int`, *optional*, defaults to `64`):
            Query block size, one of 32, 64, 128.
        blkk (`int`, *optional*, defaults to `64`):
            Key block size, one of 32, 64, 128.
        feature_map (`str`, *optional*, defaults to `"softmax"`):
            Feature map phi of the linear branch: `"softmax"` (over the head dim), `"elu"` (elu(x) + 1) or `"relu"`.
        tie_feature_map_qk (`bool`, *optional*, defaults to `True`):
            Use the same feature map for queries and keys. The three feature maps have no parameters, so tied and
            untied maps compute the same function; the field is kept for compatibility with existing SLA configs.
        linear_scope (`str`, *optional*, defaults to `"rest"`):
            `"rest"`: the linear branch covers the key blocks not selected for the sparse branch (the paper's design).
            `"all"`: the linear branch covers every key block (the reference implementation's main branch).
            `"none"`: no linear branch: the output is the sparse part alone (exact softmax over the selected blocks),
            `proj_l` is neither read nor given a gradient. For sparse-only baselines and ablations.
        protect_text (`bool`, *optional*, defaults to `True`):
            In joint text+image attention (Flux, SD3, QwenImage, HunyuanVideo, CogVideoX), every query block attends
            exactly to the key blocks holding the text tokens, on top of its `topk` share of the other blocks (and
            counted in the density). An operator field: SLA weights saved before it existed load with `False`.
        fusion (`str`, *optional*, defaults to `"sla"`):
            How the two branches are combined (docs/fusion.md). `"sla"`: sparse part + `proj_l(linear part)`, the
            paper's sum. `"mass"`: a weighted mean of the sparse part and the linear term `o_lin + proj_l(o_lin)`,
            weighted by the exact softmax mass of the selected blocks and an estimate of the rest's mass. `"ratio"`:
            the same mean with a learnable weight `sigmoid(q . u + c)` (float32 `u`, `c` per layer, stored in the
            sidecar). `"mass"` and `"ratio"` need `linear_scope="rest"`.
        cross_attention (`str`, *optional*, defaults to `"dense"`):
            Route for cross-attention calls (keys from another sequence than the queries, e.g. text): `"dense"` keeps
            the model's own attention, `"sla"` uses SLA.
        masked_attention (`str`, *optional*, defaults to `"sla"`):
            Route for calls with a key padding mask (QwenImage, HunyuanVideo text padding): `"sla"` runs SLA over the
            unmasked keys only, `"dense"` keeps the model's own attention. Masks that are not key padding masks always
            run dense.
        min_kv_blocks (`int`, *optional*, defaults to `4`):
            Calls whose key sequence has fewer than this many key blocks run dense: SLA gains nothing there.
        dense_layers (`tuple` of `int` or `str`, *optional*, defaults to `()`):
            Attention modules that keep the model's own attention (reason `"dense_layer"` in `sla_summary`): an
            integer is a transformer block index (counted over the model's top-level `*blocks` lists in module
            order, negative from the end), a string a glob on the module path (`"transformer_blocks.0.*"`) that also
            matches the attention modules below a matched path. Applied by `enable_sla` and `set_attn_processor`.
    """

    topk: float = field(default=0.2, metadata={"help": "Fraction of key blocks kept for exact attention, in (0, 1]."})
    blkq: int = field(default=64, metadata={"help": "Query block size: 32, 64 or 128."})
    blkk: int = field(default=64, metadata={"help": "Key block size: 32, 64 or 128."})
    feature_map: str = field(default="softmax", metadata={"help": "Linear-branch feature map: softmax, elu or relu."})
    tie_feature_map_qk: bool = field(default=True, metadata={"help": "Same feature map for queries and keys."})
    linear_scope: str = field(
        default="rest",
        metadata={"help": "Key blocks of the linear branch: 'rest' (not selected), 'all', or 'none' (sparse only)."},
    )
    protect_text: bool = field(
        default=True, metadata={"help": "Joint attention: every query block keeps the text tokens' key blocks."}
    )
    cross_attention: str = field(default="dense", metadata={"help": "Route for cross-attention: 'dense' or 'sla'."})
    masked_attention: str = field(
        default="sla", metadata={"help": "Route for calls with a key padding mask: 'sla' or 'dense'."}
    )
    min_kv_blocks: int = field(default=4, metadata={"help": "Calls with fewer key blocks than this run dense."})
    dense_layers: tuple = field(
        default=(), metadata={"help": "Block indices or module-path globs of attention modules kept dense."}
    )
    # last, so that positional construction keeps its meaning
    fusion: str = field(
        default="sla",
        metadata={"help": "Branch combination: 'sla' (sparse + proj_l(linear)), 'mass' (mass-weighted mean) or "
                          "'ratio' (learnable weight); 'mass'/'ratio' need linear_scope 'rest'."},
    )

    def __post_init__(self):
        # The dataclass is frozen: normalised values go in through object.__setattr__. One rule for every field:
        # Python and numpy scalars alike (JSON and numpy users hand us either), stored as plain Python values.
        def store(name, value):
            object.__setattr__(self, name, value)

        topk = _plain(self.topk)
        if isinstance(topk, bool) or not isinstance(topk, (int, float)):
            raise ValueError(f"`topk` must be a number in (0, 1], got {self.topk!r}.")
        store("topk", float(topk))
        if not 0.0 < self.topk <= 1.0:
            raise ValueError(f"`topk` must be in (0, 1], got {self.topk}.")
        for name in ("blkq", "blkk"):
            value = _whole_number(getattr(self, name))
            if value not in ALLOWED_BLOCK_SIZES:
                raise ValueError(f"`{name}` must be one of {list(ALLOWED_BLOCK_SIZES)}, got {getattr(self, name)!r}.")
            store(name, value)
        for name, allowed in (
            ("feature_map", ALLOWED_FEATURE_MAPS),
            ("linear_scope", ALLOWED_LINEAR_SCOPES),
            ("fusion", ALLOWED_FUSIONS),
            ("cross_attention", ALLOWED_ROUTES),
            ("masked_attention", ALLOWED_ROUTES),
        ):
            value = _plain(getattr(self, name))
            if not isinstance(value, str) or value.lower() not in allowed:
                raise ValueError(f"`{name}` must be one of {list(allowed)}, got {getattr(self, name)!r}.")
            store(name, str(value).lower())
        if self.fusion != "sla" and self.linear_scope != "rest":
            # "all" would count the selected blocks' mass twice; "none" has no linear branch to weigh
            raise ValueError(
                f"`fusion={self.fusion!r}` needs `linear_scope='rest'`, got `linear_scope={self.linear_scope!r}`."
            )
        for name in ("tie_feature_map_qk", "protect_text"):
            value = _plain(getattr(self, name))
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be true or false, got {getattr(self, name)!r}.")
            store(name, value)
        min_kv_blocks = _whole_number(self.min_kv_blocks)
        if min_kv_blocks is None or min_kv_blocks < 0:
            raise ValueError(f"`min_kv_blocks` must be a non-negative integer, got {self.min_kv_blocks!r}.")
        store("min_kv_blocks", min_kv_blocks)
        store("dense_layers", layer_selectors("dense_layers", self.dense_layers))

    # ----- construction -------------------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, allow_unknown: bool = False) -> SLAConfig:
        """Build a config from a dict. Unknown keys are an error (a typo must not be ignored), unless
        `allow_unknown=True`, used for files written by a newer version: those keys are dropped with a warning."""
        if not isinstance(values, dict):
            raise TypeError(f"SLAConfig.from_dict expects a dict, got {type(values).__name__}.")
        known = cls.field_names()
        unknown = sorted(set(values) - set(known) - {"diffusers_sla_version"})
        if unknown:
            message = f"Unknown SLAConfig keys {unknown}; known keys are {known}."
            if not allow_unknown:
                raise ValueError(message)
            warnings.warn(message + " They were ignored (file written by a newer diffusers-sla?).", stacklevel=2)
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json(cls, source: str | os.PathLike, *, allow_unknown: bool = False) -> SLAConfig:
        """Build a config from a JSON string (`'{"topk": 0.15}'`) or from the path of a JSON file."""
        text = os.fspath(source)
        where = "JSON"
        if not text.lstrip().startswith("{"):
            if not os.path.isfile(text):
                raise ValueError(f"SLAConfig.from_json expects a JSON object or a path to a .json file, got {text!r}.")
            where = text
            try:
                with open(text, encoding="utf-8") as handle:
                    text = handle.read()
            except UnicodeDecodeError as err:
                raise ValueError(f"SLAConfig.from_json could not read {where} as UTF-8 JSON: {err}.") from None
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"SLAConfig.from_json could not parse {where}: {err}.") from err
        if not isinstance(values, dict):
            raise ValueError(
                f"SLAConfig.from_json: {where} must hold a JSON object of SLAConfig fields, got "
                f"{type(values).__name__}."
            )
        return cls.from_dict(values, allow_unknown=allow_unknown)

    @classmethod
    def coerce(cls, config: SLAConfig | dict | str | os.PathLike | None = None, **overrides) -> SLAConfig:
        """The one entry point that turns whatever a user passed (None, a config, a dict, JSON text or a JSON file)
        plus keyword overrides into a validated `SLAConfig`."""
        if config is None:
            base = cls()
        elif isinstance(config, cls):
            base = config
        elif isinstance(config, dict):
            base = cls.from_dict(config)
        elif isinstance(config, (str, os.PathLike)):
            base = cls.from_json(config)
        else:
            raise TypeError(
                f"`config` must be an SLAConfig, a dict, a JSON string or a path, got {type(config).__name__}."
            )
        if not overrides:
            return base
        unknown = sorted(set(overrides) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"Unknown SLAConfig keys {unknown}; known keys are {cls.field_names()}.")
        return dataclasses.replace(base, **overrides)

    # ----- serialisation ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["dense_layers"] = list(self.dense_layers)  # what JSON gives back
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the config as JSON to `path` (a file)."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({**self.to_dict(), "diffusers_sla_version": __version__}, handle, indent=2, sort_keys=True)

    def operator_dict(self) -> dict[str, Any]:
        """The fields that change what SLA computes (see module docstring)."""
        return {name: getattr(self, name) for name in OPERATOR_FIELDS}

    def operator_differences(self, other: SLAConfig) -> dict[str, tuple[Any, Any]]:
        """`{field: (self_value, other_value)}` for every operator field that differs."""
        return {
            name: (getattr(self, name), getattr(other, name))
            for name in OPERATOR_FIELDS
            if getattr(self, name) != getattr(other, name)
        }
