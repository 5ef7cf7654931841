"""Atomic writes: a write killed mid-way leaves one `.<name>.tmp` that the next write of the
same file removes; a failed write leaves nothing."""

import pytest

from captionflow.utils.io import atomic_path, write_json


def test_the_next_write_removes_what_a_killed_write_left(tmp_path):
    stale = tmp_path / ".a.json.tmp"
    stale.write_bytes(b"half a file from a SIGKILLed writer")
    write_json(tmp_path / "a.json", {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failed_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with atomic_path(tmp_path / "b.pt") as tmp:
            tmp.write_bytes(b"partial")
            raise ZeroDivisionError
    assert list(tmp_path.iterdir()) == []
