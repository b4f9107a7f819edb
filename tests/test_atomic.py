"""Atomic writes: files and folders appear whole or not at all, as a plain write would."""

from __future__ import annotations

import os
import stat

import pytest

from mpo.atomic import recover_folder, remove_folder, staged_folder, write_json


def publish(target, text="new"):
    with staged_folder(target) as staging:
        (staging / "file.txt").write_text(text)


def test_a_published_folder_has_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        publish(tmp_path / "out")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755  # not mkdtemp's 0700


def test_a_link_to_a_folder_gets_the_folder_replaced_and_stays_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    publish(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "real" / "file.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


@pytest.mark.parametrize("old", ["folder", "file"])
def test_replacing_leaves_no_backup_behind(tmp_path, old):
    target = tmp_path / "out"
    if old == "folder":
        publish(target, "old")
    else:
        target.write_text("old")
    publish(target)
    assert (target / "file.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failure_inside_leaves_the_old_folder_and_no_staging(tmp_path):
    target = tmp_path / "out"
    publish(target, "old")

    def interrupted():
        with staged_folder(target) as staging:
            (staging / "file.txt").write_text("half")
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted()
    assert (target / "file.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_json_replaces_a_file_whole(tmp_path):
    path = tmp_path / "data.json"
    write_json(path, {"a": 1})
    write_json(path, {"b": 2})
    assert path.read_text() == '{\n  "b": 2\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_a_folder_renamed_aside_by_a_killed_swap_is_put_back(tmp_path):
    target = tmp_path / "state"
    publish(target, "old")
    # killed between publish_folder's two renames: the old folder aside, no target
    os.rename(target, tmp_path / ".state.0123abcd.old")
    assert recover_folder(target)
    assert (target / "file.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state"]
    assert not recover_folder(target)  # nothing to do when the target is there


def test_only_this_folders_backups_are_recovered_or_removed(tmp_path):
    (tmp_path / ".model.v2.0123abcd.old").mkdir()  # model.v2's backup, not model's
    assert not recover_folder(tmp_path / "model")
    (tmp_path / ".model.89abcdef.old").mkdir()
    (tmp_path / ".model.01234567.tmp").mkdir()
    remove_folder(tmp_path / "model")
    assert [p.name for p in tmp_path.iterdir()] == [".model.v2.0123abcd.old"]
