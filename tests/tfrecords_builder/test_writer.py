import pytest
import tensorflow as tf

from kerasunet.core.records_format import SHARD_RE, file_sha256, shard_name
from tfrecords_builder.writer import ShardWriter


def test_shard_name_is_tfds_style_and_matches_the_pattern():
    assert shard_name("lits", "train", 0, 3) == "lits-train.tfrecord-00000-of-00003"
    assert SHARD_RE.match(shard_name("mri", "val", 11, 12)).group("split") == "val"


def test_shard_name_rejects_an_index_out_of_range():
    with pytest.raises(ValueError, match=r"Expected 0 <= index < total. Received: index=3, total=3"):
        shard_name("lits", "train", 3, 3)


def test_writer_rolls_over_by_size_and_renames_contiguous_shards(tmp_path):
    writer = ShardWriter(tmp_path, "lits", "train", shard_bytes=250)
    for i in range(10):
        writer.write(bytes([i]) * 100)
        assert not list(tmp_path.glob("lits-*"))  # final names appear only at the end
    shards = writer.finish()
    assert [s["num_examples"] for s in shards] == [3, 3, 3, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [s["file"] for s in shards]
    records = [r for s in shards for r in tf.data.TFRecordDataset(str(tmp_path / s["file"])).as_numpy_iterator()]
    assert [r[0] for r in records] == list(range(10))
    assert all(file_sha256(tmp_path / s["file"]) == s["sha256"] for s in shards)


def test_abort_leaves_nothing_behind(tmp_path):
    writer = ShardWriter(tmp_path, "lits", "val", shard_bytes=150)
    for i in range(3):
        writer.write(b"x" * 100)
    writer.abort()
    assert list(tmp_path.iterdir()) == []
