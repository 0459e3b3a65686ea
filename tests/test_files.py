"""``atomic_directory``: a save appears whole or not at all, sub-folders included."""

from __future__ import annotations

import pytest

from afmkit.files import atomic_directory


def test_a_save_with_a_subfolder_replaces_the_old_one_whole(tmp_path):
    dest = tmp_path / "model"
    with atomic_directory(dest) as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_directory(dest) as tmp:
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "weights.bin").write_bytes(b"\x00\x01")
        (tmp / "heads.json").write_text("{}")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "adapter",
        "adapter/weights.bin",
        "heads.json",
    ]
    assert not list(tmp_path.glob(".model.*"))


def test_a_failed_save_leaves_the_old_directory_as_it_was(tmp_path):
    dest = tmp_path / "model"
    with atomic_directory(dest) as tmp:
        (tmp / "kept.txt").write_text("kept")
    with pytest.raises(RuntimeError), atomic_directory(dest) as tmp:
        (tmp / "sub").mkdir()
        raise RuntimeError("killed mid-save")
    assert [p.name for p in dest.iterdir()] == ["kept.txt"]
    assert not list(tmp_path.glob(".model.*"))
