"""raysim.atomic: a write is all or nothing, the bytes are the serializer's own, the mode applies."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest

from raysim.atomic import write_atomic


def test_text_bytes_and_a_writer_give_the_bytes_they_would_give_a_plain_file(tmp_path):
    write_atomic(tmp_path / "a.txt", "é\n")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    vector = np.arange(7, dtype=np.float32)
    write_atomic(tmp_path / "v.npy", lambda handle: np.save(handle, vector))
    expected = io.BytesIO()
    np.save(expected, vector)
    assert (tmp_path / "a.txt").read_bytes() == "é\n".encode("utf-8")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "v.npy").read_bytes() == expected.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "v.npy"]  # no temporary left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.pkl"
    write_atomic(target, pickle.dumps({"round": 1}))

    def half_then_fail(handle):
        handle.write(b"torn")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, half_then_fail)
    assert pickle.loads(target.read_bytes()) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pkl"]


def test_the_mode_applies_from_creation(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "key", b"secret", mode=0o600)
        write_atomic(tmp_path / "open", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "open").stat().st_mode & 0o777 == 0o644
