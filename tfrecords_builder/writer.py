"""Sharded TFRecord writing with TFDS-style names, under temporary names until complete.

Shards hold contiguous runs of examples and roll over at a target size (the uncompressed
record bytes). While a split is being written its shards are ``.tmp-NAME-SPLIT.tfrecord-N``;
only when the whole split is written are they renamed to their final
``NAME-SPLIT.tfrecord-00000-of-00003`` names (the total is known only then).
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow as tf

from kerasunet.core.records_format import file_sha256, shard_name, temp_shard_name

_RECORD_OVERHEAD = 16  # TFRecord framing: length (8) + two CRCs (4 + 4)


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
        self.options = tf.io.TFRecordOptions(compression_type="GZIP" if gzip else "")
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
        self._size += len(serialized) + _RECORD_OVERHEAD
        if self._size >= self.shard_bytes:
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
