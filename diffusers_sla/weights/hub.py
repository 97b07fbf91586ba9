# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Finding `sla_attention.safetensors`: a file, a local folder, a Hugging Face cache snapshot or a Hub repo, with
messages that say how to fetch it when offline."""

from __future__ import annotations

import os
import shlex

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from diffusers_sla.config import SLA_WEIGHTS_NAME


def parse_hf_cache_path(directory: str) -> tuple[str, str, str, str] | None:
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
    path_in_repo = f"{subfolder + '/' if subfolder else ''}{filename}"
    where = f"{repo_id}/{path_in_repo} on the Hugging Face Hub"
    try:
        # (looked up at call time: tests mock the Hub's servers there)
        path = huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, subfolder=subfolder or None,
                                               **hub_kwargs)
        return path, where
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
        snapshot = parse_hf_cache_path(os.path.join(text, subfolder or ""))
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
