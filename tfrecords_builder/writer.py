"""Sharded TFRecord writing with TFDS-style names, under temporary names until complete.

Shards hold contiguous runs of examples and roll over at a target size (the uncompressed
record bytes, :func:`record_size`; :func:`shard_counts` applies the same rule to a list of
sizes, which is how the Beam engine cuts a split into shards). While a split is being
written its shards are ``.tmp-NAME-SPLIT.tfrecord-N``; only when the whole split is written
are they renamed to their final ``NAME-SPLIT.tfrecord-00000-of-00003`` names (the total is
known only then).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import tensorflow as tf

from kerasunet.core.records_format import file_sha256, shard_name, temp_shard_name

_RECORD_OVERHEAD = 16  # TFRecord framing: length (8) + two CRCs (4 + 4)


def record_size(serialized: bytes) -> int:
    """Bytes one serialised example takes in an uncompressed shard (with the TFRecord framing)."""
    return len(serialized) + _RECORD_OVERHEAD


def _shard_full(size: int, shard_bytes: int) -> bool:
    return size >= shard_bytes


def shard_counts(sizes: Iterable[int], shard_bytes: int) -> list[int]:
    """How many consecutive examples each shard holds when records of ``sizes`` are written in order.

    The rule of :class:`ShardWriter`: a shard is closed as soon as its records reach
    ``shard_bytes``; the last shard holds the rest.

    Args:
        sizes: :func:`record_size` of each example, in writing order.
        shard_bytes: the target shard size.
    """
    counts, count, size = [], 0, 0
    for s in sizes:
        count, size = count + 1, size + s
        if _shard_full(size, shard_bytes):
            counts.append(count)
            count, size = 0, 0
    return counts + [count] if count else counts


def _options(gzip: bool) -> tf.io.TFRecordOptions:
    return tf.io.TFRecordOptions(compression_type="GZIP" if gzip else "")


def write_records(path: str | Path, records: Iterable[bytes], gzip: bool = False) -> int:
    """Writes serialised examples, in order, into one TFRecord file; returns how many."""
    count = 0
    with tf.io.TFRecordWriter(str(path), _options(gzip)) as writer:
        for record in records:
            writer.write(record)
            count += 1
    _sync(Path(path))
    return count


def _sync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


class ShardWriter:
    """Writes the examples of one split into shards of about ``shard_bytes`` each.

    Use :meth:`write` for each serialised example in order, then :meth:`finish`, which
    renames the shards to their final names and returns their manifest entries.
    """

    def __init__(self, out_dir: str | Path, name: str, split: str, shard_bytes: int, gzip: bool = False):
        if shard_bytes <= 0:
            raise ValueError(f"Expected shard_bytes > 0. Received: shard_bytes={shard_bytes}")
        self.out_dir, self.name, self.split = Path(out_dir), name, split
        self.shard_bytes = shard_bytes
        self.options = _options(gzip)
        self._done: list[tuple[Path, int]] = []
        self._writer = None
        self._path = None
        self._count = self._size = 0

    def write(self, serialized: bytes) -> None:
        if self._writer is None:
            self._path = self.out_dir / temp_shard_name(self.name, self.split, len(self._done))
            self._writer = tf.io.TFRecordWriter(str(self._path), self.options)
        self._writer.write(serialized)
        self._count += 1
        self._size += record_size(serialized)
        if _shard_full(self._size, self.shard_bytes):
            self._close_shard()

    def _close_shard(self) -> None:
        self._writer.close()
        _sync(self._path)
        self._done.append((self._path, self._count))
        self._writer, self._count, self._size = None, 0, 0

    def finish(self) -> list[dict]:
        """Closes the last shard and renames all shards to their final names.

        Returns:
            ``[{"file", "num_examples", "sha256"}]`` in shard order.
        """
        if self._writer is not None:
            self._close_shard()
        total, entries = len(self._done), []
        for index, (tmp, count) in enumerate(self._done):
            final = self.out_dir / shard_name(self.name, self.split, index, total)
            entries.append({"file": final.name, "num_examples": count, "sha256": file_sha256(tmp)})
            os.replace(tmp, final)
        return entries

    def abort(self) -> None:
        """Closes and deletes every shard written so far."""
        if self._writer is not None:
            self._writer.close()
            self._done.append((self._path, self._count))
            self._writer = None
        for path, _ in self._done:
            path.unlink(missing_ok=True)
        self._done = []
