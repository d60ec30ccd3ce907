"""The on-disk facts of a records folder that writer and reader share (TensorFlow-free).

A records folder holds TFDS-style shards ``NAME-SPLIT.tfrecord-00000-of-00003`` and one
``manifest.json`` (counts, cases, skipped cases, settings, SHA-256 of every shard). While a
split is being written its shards carry the temporary prefix ``.tmp-``. Builds read cases
in ``DEFAULT_WORKERS`` processes unless told otherwise.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

MANIFEST_FILE = "manifest.json"
SHARD_RE = re.compile(r"^(?P<name>[\w.]+)-(?P<split>\w+)\.tfrecord-(?P<index>\d{5})-of-(?P<total>\d{5})$")
TEMP_PREFIX = ".tmp-"
# Worker processes of a build (`build-records --workers`, `experiment --workers`). Each holds
# one case in memory (a LiTS CT can be ~1 GB as float32), so it is a small fixed number
# rather than the CPU count.
DEFAULT_WORKERS = 4
# 2.5D context K of slice records (`build-records --context`): K neighbouring slices on each
# side become channels (2K + 1). 2 is what the held-out phantoms of docs/quality.md favour at
# the same CPU budget; a volume build (`--volumes`) has 0.
DEFAULT_CONTEXT = 2
# Build engines (`build-records --engine`); the manifest's "engine" names the one that built it.
ENGINES = ("local", "beam")


def context_channels(context: int) -> int:
    """The input channels of 2.5D context ``context``: the slice and ``context`` neighbours a side."""
    return 2 * int(context) + 1


def channels_context(channels: int) -> int:
    """The 2.5D context of ``channels`` input channels (``2K + 1``; the inverse of :func:`context_channels`)."""
    return (int(channels) - 1) // 2


def shard_name(name: str, split: str, index: int, total: int) -> str:
    """The TFDS-style file name of a shard: ``NAME-SPLIT.tfrecord-00000-of-00003``."""
    if not 0 <= index < total:
        raise ValueError(f"Expected 0 <= index < total. Received: index={index}, total={total}")
    return f"{name}-{split}.tfrecord-{index:05d}-of-{total:05d}"


def temp_shard_name(name: str, split: str, index: int) -> str:
    """The name of a shard while its split is still being written."""
    return f"{TEMP_PREFIX}{name}-{split}.tfrecord-{index:05d}"


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
