# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Log-once lines that are safe inside torch.compile'd code."""

from __future__ import annotations

import logging
import threading

import torch
from torch._dynamo.comptime import comptime

# The logger name users filter on and the user guides print (`INFO:diffusers_sla.processor:SLA: ...`): it names the
# glue as a whole, not the module a line comes from.
logger = logging.getLogger("diffusers_sla.processor")

_logged_once: set = set()
_logged_once_lock = threading.Lock()


def log_once(key, level: int, message: str) -> None:
    """Log `message` the first time `key` is seen in this process. Inside torch.compile'd code the check and the
    log happen while dynamo traces (`comptime`), never in the graph: compiled code must not read the set of keys
    (it would guard on it, and the next call would recompile) nor call the logger (a graph break)."""
    if torch.compiler.is_compiling():
        comptime(_log_once_while_tracing)
        return
    _log_once_now(key, level, message)


def already_logged(key) -> bool:
    """Whether `key` was logged (eager callers skip building a message that would not be logged)."""
    return key in _logged_once


def _log_once_now(key, level: int, message: str) -> None:
    with _logged_once_lock:
        if key in _logged_once:
            return
        _logged_once.add(key)
    logger.log(level, message)


def _log_once_while_tracing(ctx) -> None:
    # runs inside dynamo: `key`, `level` and `message` are the traced constants of `log_once`'s frame
    values = [ctx.get_local(name).as_python_constant() for name in ("key", "level", "message")]
    _log_once_now(*values)
