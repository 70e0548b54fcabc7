"""megareuse.atomic: files replaced whole, links and directories published whole."""
import os

import pytest

from megareuse.atomic import publish_dir, symlink_atomic, write_atomic, write_text_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.json"
    write_text_atomic(path, "old")

    def fail(fh):
        fh.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]


def test_symlink_atomic_makes_and_repoints_a_link(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    link = tmp_path / "link"
    symlink_atomic(link, tmp_path / "a")
    symlink_atomic(link, tmp_path / "b")
    assert os.readlink(link) == str(tmp_path / "b") and sorted(os.listdir(tmp_path)) == ["a", "b", "link"]


def test_publish_dir_replaces_only_when_told_where_the_old_copy_goes(tmp_path):
    final = tmp_path / "out"
    for text in ("one", "two"):
        (tmp_path / "stage").mkdir()
        (tmp_path / "stage" / "x").write_text(text)
        if final.exists():
            with pytest.raises(FileExistsError):
                publish_dir(tmp_path / "stage", final)
        publish_dir(tmp_path / "stage", final, previous=tmp_path / ".old")
    assert (final / "x").read_text() == "two" and os.listdir(tmp_path) == ["out"]
