"""Token shards: round trip, memory mapping, and clear errors for damaged files."""

import numpy as np
import pytest

from phikit.data.shards import (ShardError, load_tokens, read_manifest, read_shard, write_manifest,
                                write_shard)


def test_round_trip_with_large_ids(tmp_path):
    tokens = np.array([0, 1, 199_999, 200_063, 2**32 - 1], dtype=np.int64)  # beyond uint16: Phi-4-mini ids
    read = read_shard(write_shard(tmp_path / "s.bin", tokens))
    assert read.dtype == np.uint32 and read.tolist() == tokens.tolist()
    assert isinstance(read, np.memmap)
    assert read_shard(write_shard(tmp_path / "e.bin", np.zeros(0))).size == 0


def test_manifest_and_load(tmp_path):
    write_shard(tmp_path / "a.bin", np.arange(5))
    write_shard(tmp_path / "b.bin", np.arange(3))
    write_manifest(tmp_path, {"vocab_size": 10, "eos_id": 0, "shards": [{"file": "a.bin", "tokens": 5},
                                                                         {"file": "b.bin", "tokens": 3}]})
    assert [s.tolist() for s in load_tokens(tmp_path)] == [[0, 1, 2, 3, 4], [0, 1, 2]]
    (tmp_path / "b.bin").unlink()
    with pytest.raises(ShardError, match="lists b.bin, which is missing"):
        read_manifest(tmp_path)


def test_damaged_shards(tmp_path):
    path = write_shard(tmp_path / "s.bin", np.arange(100))
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(ShardError, match="the header promises"):
        read_shard(path)
    path.write_bytes(b"NOTASHRD" + data[8:])
    with pytest.raises(ShardError, match="not a phikit token shard"):
        read_shard(path)
    path.write_bytes(b"abc")
    with pytest.raises(ShardError, match="too short"):
        read_shard(path)
    with pytest.raises(ShardError, match="token ids must lie in"):
        write_shard(tmp_path / "neg.bin", np.array([-1]))
    with pytest.raises(ShardError, match="has no manifest.json"):
        read_manifest(tmp_path / "nowhere")
