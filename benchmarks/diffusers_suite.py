# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Peer check: diffusers' own model tests, run with SLA installed on every model they build.

diffusers' tests live in its repository, not in the wheel: point this script at a checkout (`git clone
https://github.com/huggingface/diffusers`; the installed diffusers is what runs, the checkout only supplies
`tests/`). For each family it runs `tests/models/transformers/<file>` under pytest with this file loaded as a plugin
(`-p benchmarks.diffusers_suite`), which calls

    enable_sla(model, topk=1.0, blkq=32, blkk=32, min_kv_blocks=0)

on every diffusers model the tests construct (after `__init__`, or after `from_pretrained` returns, which also
replays a saved `sla_attention.safetensors`). At `topk=1.0` SLA is exact attention, so a test that passes without
SLA and fails with it shows a contract SLA breaks. `--no-sla` runs the same selection without SLA (the baseline).

    python -m benchmarks.diffusers_suite --diffusers ~/src/diffusers --out logs/peer [--families wan flux sd3]
        [--no-sla] [--unskip-compile] [-- extra pytest arguments, e.g. -x -k processor]

Writes `<out>/<sla|dense>.xml` (JUnit), `<out>/<sla|dense>.log`, and prints pytest's summary plus the number of
attention calls SLA ran. `--unskip-compile` also runs diffusers' accelerator-only `TorchCompileTesterMixin` tests on
the CPU (inductor compiles C++: minutes per test).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SLA_SETTINGS = {"topk": 1.0, "blkq": 32, "blkk": 32, "min_kv_blocks": 0}

# The families the peer check covers and their test files under diffusers' tests/models/transformers/.
FAMILIES = {
    "wan": ["test_models_transformer_wan.py"],
    "wan_animate": ["test_models_transformer_wan_animate.py"],
    "wan_vace": ["test_models_transformer_wan_vace.py"],
    "flux": ["test_models_transformer_flux.py"],
    "flux2": ["test_models_transformer_flux2.py"],
    "sd3": ["test_models_transformer_sd3.py"],
    "qwenimage": ["test_models_transformer_qwenimage.py"],
    "cogvideox": ["test_models_transformer_cogvideox.py"],
    "ltx": ["test_models_transformer_ltx.py"],
    "ltx2": ["test_models_transformer_ltx2.py"],
    "hunyuanvideo": ["test_models_transformer_hunyuan_video.py"],
    "hunyuanvideo_framepack": ["test_models_transformer_hunyuan_video_framepack.py"],
    "pixart": ["test_models_pixart_transformer2d.py"],
}


# ===== The pytest plugin (loaded inside the pytest process with `-p benchmarks.diffusers_suite`) =====

_loading = threading.local()
_installed = [0]
_stats: list = []  # the per-layer counters of every model SLA was installed on (they outlive the models)


def _install_sla(model) -> None:
    from diffusers_sla import enable_sla
    from diffusers_sla.integration.report import sla_modules
    from diffusers_sla.integration.stats import layer_stats

    try:
        enable_sla(model, **SLA_SETTINGS)
    except ValueError as err:
        if "has no attention module" in str(err):  # VAEs, embedders: nothing to run SLA in
            return
        raise
    _installed[0] += 1
    _stats.extend(layer_stats(attn) for _, attn in sla_modules(model))


def _wrap_init(cls) -> None:
    original = cls.__dict__["__init__"]
    if getattr(original, "_sla_peer", False):
        return

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        # only the outermost __init__ of the instance's own class, and not inside from_pretrained (its weights are
        # not loaded yet; the from_pretrained wrapper installs SLA once they are)
        outermost = next(c for c in type(self).__mro__ if "__init__" in c.__dict__).__dict__["__init__"]
        if outermost is __init__ and not getattr(_loading, "depth", 0):
            _install_sla(self)

    __init__._sla_peer = True
    __init__.__wrapped__ = original
    cls.__init__ = __init__


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def _wrap_from_pretrained() -> None:
    from diffusers import ModelMixin

    current = ModelMixin.__dict__["from_pretrained"].__func__

    def from_pretrained(cls, *args, **kwargs):
        _loading.depth = getattr(_loading, "depth", 0) + 1
        try:
            model = current(cls, *args, **kwargs)
        finally:
            _loading.depth -= 1
        if not _loading.depth:
            _install_sla(model)
        return model

    ModelMixin.from_pretrained = classmethod(from_pretrained)


def _unskip_compile(items) -> None:
    # diffusers marks its compile tests accelerator-only (`require_accelerator`, a skipif); they run on the CPU too.
    for item in items:
        if item.cls is None or not any(c.__name__ == "TorchCompileTesterMixin" for c in item.cls.__mro__):
            continue
        for node in item.listchain():
            node.own_markers[:] = [
                mark for mark in node.own_markers
                if not (mark.name == "skipif" and "accelerator" in str(mark.kwargs.get("reason", "")))
            ]


def pytest_addoption(parser):
    parser.addoption("--sla-off", action="store_true", help="diffusers_suite: do not install SLA (baseline)")
    parser.addoption("--sla-unskip-compile", action="store_true",
                     help="diffusers_suite: run the accelerator-only compile tests on the CPU")


def pytest_configure(config):
    if config.getoption("--sla-off"):
        return
    import diffusers_sla  # noqa: F401  (installs its diffusers hooks)

    _wrap_from_pretrained()


def pytest_collection_modifyitems(session, config, items):
    if config.getoption("--sla-unskip-compile"):
        _unskip_compile(items)
    if config.getoption("--sla-off"):
        return
    # Every test module is imported now, so every model class the tests build exists.
    from diffusers import ModelMixin

    for cls in set(_all_subclasses(ModelMixin)):
        if "__init__" in cls.__dict__:
            _wrap_init(cls)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.getoption("--sla-off"):
        terminalreporter.write_line("diffusers_suite: SLA off (baseline)")
        return
    calls = sum(stats.sla_calls for stats in _stats)
    dense = sum(stats.total_dense_calls for stats in _stats)
    terminalreporter.write_line(
        f"diffusers_suite: SLA installed on {_installed[0]} models with {SLA_SETTINGS}: {calls} attention calls ran "
        f"SLA, {dense} dense (eager calls; compiled ones are not counted)"
    )


# ===== Command line =====


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffusers", required=True, type=Path, help="a diffusers checkout (its tests/ folder)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the JUnit XML and the log")
    parser.add_argument("--families", nargs="+", default=["wan", "flux", "sd3", "qwenimage"],
                        choices=sorted(FAMILIES), metavar="FAMILY",
                        help=f"families to run (default: wan flux sd3 qwenimage; all: {' '.join(FAMILIES)})")
    parser.add_argument("--no-sla", action="store_true", help="run without SLA (the baseline)")
    parser.add_argument("--unskip-compile", action="store_true",
                        help="also run diffusers' accelerator-only torch.compile tests on the CPU")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    tests_dir = args.diffusers / "tests" / "models" / "transformers"
    if not tests_dir.is_dir():
        parser.error(f"`--diffusers`: {args.diffusers} has no tests/models/transformers folder (a diffusers checkout?)")
    files = [str(tests_dir / name) for family in args.families for name in FAMILIES[family]]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        parser.error(f"`--families`: not in this checkout: {missing}")
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "dense" if args.no_sla else "sla"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])  # pytest runs in the checkout
    command = [sys.executable, "-m", "pytest", "-p", "benchmarks.diffusers_suite", "-p", "no:cacheprovider", "-q",
               "-rfE", f"--junitxml={args.out / (tag + '.xml')}", *files, *extra]
    command += ["--sla-off"] if args.no_sla else []
    command += ["--sla-unskip-compile"] if args.unskip_compile else []
    with open(args.out / f"{tag}.log", "w") as log:
        process = subprocess.run(command, cwd=args.diffusers, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        log.write(process.stdout)
    tail = process.stdout.strip().splitlines()
    print("\n".join(line for line in tail if line.startswith(("FAILED", "ERROR", "diffusers_suite"))))
    print(tail[-1] if tail else "(no output)")
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
