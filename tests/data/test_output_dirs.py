"""cgjax never deletes what it did not write: output folders carry a marker; a folder without it is
refused unless empty or ``overwrite``, and an output that is (or holds) an input never is replaced."""
import os
import subprocess
import sys

import pytest

from cgjax.persistence import OUTPUT_MARKER, atomic_dir, check_output_dir, write_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write(tmp_dir, name="new.txt", text="new"):
    with open(os.path.join(tmp_dir, name), "w") as f:
        f.write(text)


def test_a_users_folder_is_refused_and_kept(tmp_path):
    user = tmp_path / "models"
    user.mkdir()
    (user / "NOTES.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"was not written by cgjax .*NOTES.txt.*--overwrite"):
        with atomic_dir(user) as tmp:
            _write(tmp)
    assert os.listdir(user) == ["NOTES.txt"]
    assert [e for e in os.listdir(tmp_path) if e != "models"] == []  # no temporary left


def test_overwrite_empty_and_own_folders(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "old.txt").write_text("x")
    with atomic_dir(user, overwrite=True) as tmp:
        _write(tmp)
    assert sorted(os.listdir(user)) == sorted([OUTPUT_MARKER, "new.txt"])
    with atomic_dir(user) as tmp:  # cgjax's own output: replaced without asking
        _write(tmp, "newer.txt")
    assert sorted(os.listdir(user)) == sorted([OUTPUT_MARKER, "newer.txt"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:
        _write(tmp)
    assert (empty / "new.txt").read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(user).st_mode & 0o777 == 0o777 & ~umask  # the user's umask, not mkdtemp's 0700


def test_an_input_or_its_ancestor_is_never_replaced(tmp_path):
    work = tmp_path / "work"
    (work / "stageB").mkdir(parents=True)
    for out in (work, tmp_path):
        with pytest.raises(ValueError, match="is the input .* or a folder above it"):
            check_output_dir(out, overwrite=True, inputs=(str(work / "stageB"),))
    check_output_dir(tmp_path / "elsewhere", inputs=(str(work),))


def test_a_killed_writers_temporaries_are_removed(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-abc123"
    stale.mkdir()
    (stale / "half.bin").write_text("partial")
    with atomic_dir(out) as tmp:
        _write(tmp)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_failed_writer_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        _write(tmp, text="v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            _write(tmp, text="v2")
            raise RuntimeError("killed")
    assert (out / "new.txt").read_text() == "v1"


def test_files_written_together_are_all_kept_when_one_write_fails(tmp_path):
    """persistence.write_files puts nothing in place until every file is written; no temporary is left."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")

    def fail(tmp):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_files([(a, lambda tmp: _write_file(tmp, "new a")), (b, fail)])
    assert a.read_text() == "old a" and sorted(os.listdir(tmp_path)) == ["a.txt"]
    write_files([(a, lambda tmp: _write_file(tmp, "new a")), (b, lambda tmp: _write_file(tmp, "b"))])
    assert (a.read_text(), b.read_text()) == ("new a", "b") and sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(b).st_mode & 0o777 == 0o666 & ~umask  # the user's umask, not mkstemp's 0600


def _write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def test_hf_llava_cli_refuses_a_users_folder(tmp_path):
    """``to-orbax ckpt ~/models``: refused before loading anything, the folder kept."""
    from converters.tiny_llava import make_llava_checkpoint

    ckpt = make_llava_checkpoint(str(tmp_path / "ckpt"), "tiny", seed=0)
    models = tmp_path / "models"
    models.mkdir()
    (models / "NOTES.txt").write_text("mine")
    run = subprocess.run([sys.executable, "-m", "converters.hf_llava", "to-orbax", ckpt, str(models)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "was not written by cgjax" in run.stderr
    assert os.listdir(models) == ["NOTES.txt"]
    run = subprocess.run([sys.executable, "-m", "converters.hf_llava", "to-orbax", ckpt, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "is the input" in run.stderr  # the input's parent, even with --overwrite
    assert os.path.isfile(os.path.join(ckpt, "config.json"))


def test_export_into_its_own_workdir_is_refused(tmp_path):
    from cgjax.export import export

    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    for out in (work, tmp_path):
        with pytest.raises(ValueError, match="is the input"):
            export(str(work), str(out), overwrite=True)
    assert os.listdir(work) == ["keep.txt"]


def test_a_url_output_folder_is_refused_not_made_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="gs://bucket/out: whole output folders are written to a local disk"):
        with atomic_dir("gs://bucket/out"):
            pass
    assert os.listdir(tmp_path) == []
