"""Hugging Face IDs (``org/name``, ``org/name@revision``) -> a snapshot folder.

Looked up in the local cache first (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``,
``$HF_HOME/hub``, ``~/.cache/huggingface/hub``; ``refs/<rev>`` or ``snapshots/<rev>``, a commit
prefix of 7+ characters). One not there is downloaded into that cache with
``huggingface_hub.snapshot_download`` (the optional extra ``ame-kernels[hub]``), only the files a
merge uses (weights, JSON configs, tokenizer files), unless ``HF_HUB_OFFLINE`` is set; a failed or
impossible download is an error naming the ID. Called while the config is read, so every input
is on disk before any merging work.
"""

from __future__ import annotations

import os
from typing import Optional

from ..errors import MergeError

#: what a merge reads from a model repo (fnmatch: ``*`` also matches ``/``, so sub-folders'
#: JSON files, as sentence-transformers' ``1_Pooling/config.json``, are included)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
#: fetched only when a repo has no safetensors weights
TORCH_PATTERNS = ["*.bin", "*.pt", "*.pth"]
_TRUE = ("1", "true", "yes", "on")


class HubError(MergeError):
    """A Hugging Face ID that is neither cached nor downloadable (the message says how to fix it)."""


def hf_cache_dir() -> str:
    """HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def cached_snapshot(repo: str, rev: str, cache: str) -> Optional[str]:
    """The snapshot folder of ``repo`` at ``rev`` (a branch, tag or commit) in ``cache``, or None."""
    folder = os.path.join(cache, "models--" + repo.replace("/", "--"))
    commit = None
    refs = os.path.join(folder, "refs", rev)
    if os.path.isfile(refs):
        with open(refs, encoding="utf-8") as f:
            commit = f.read().strip()
    elif os.path.isdir(os.path.join(folder, "snapshots", rev)):
        commit = rev
    else:
        snaps = os.path.join(folder, "snapshots")
        hits = [s for s in (os.listdir(snaps) if os.path.isdir(snaps) else []) if len(rev) >= 7 and s.startswith(rev)]
        if len(hits) == 1:
            commit = hits[0]
    snap = os.path.join(folder, "snapshots", commit) if commit else None
    return snap if snap is not None and os.path.isdir(snap) else None


def resolve_hf_id(ref: str, what: str) -> str:
    """``org/name[@revision]`` -> its snapshot folder: the cache's, else downloaded (module docstring)."""
    repo, _, rev = ref.partition("@")
    rev = rev or "main"
    cache = hf_cache_dir()
    snap = cached_snapshot(repo, rev, cache)
    if snap is not None:
        return snap
    at = f"revision {rev!r} of {repo!r}" if rev != "main" else repr(repo)
    where = f"{at} is not a local path and not in the Hugging Face cache ({cache}: HF_HUB_CACHE or $HF_HOME/hub)"
    how = (f"download it first (`hf download {repo}{' --revision ' + rev if rev != 'main' else ''}`), "
           "or give a local path")
    if offline():
        raise HubError(f"{what}: {where}, and HF_HUB_OFFLINE is set, so nothing is downloaded: unset it, {how}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HubError(f"{what}: {where}; downloading it needs huggingface_hub: pip install huggingface_hub "
                       f"(or ame-kernels[hub]), {how}") from None
    revision = None if rev == "main" else rev
    try:
        snap = snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=ALLOW_PATTERNS)
        if not _has(snap, ".safetensors"):
            snap = snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=TORCH_PATTERNS)
    except Exception as e:  # noqa: BLE001 (network, auth, a missing repo or revision: one line naming the ID)
        raise HubError(f"{what}: {where}, and downloading it failed ({type(e).__name__}: {e}); {how}, or set "
                       "HF_HUB_OFFLINE=1 to use the cache only") from None
    if not snap or not os.path.isdir(str(snap)):
        raise HubError(f"{what}: downloading {at} gave no snapshot folder ({snap!r})")
    return str(snap)


def _has(folder, suffix: str) -> bool:
    for _, _, files in os.walk(str(folder)):
        if any(f.endswith(suffix) for f in files):
            return True
    return False
