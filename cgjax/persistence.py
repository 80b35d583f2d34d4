"""Paths and whole-file writes on a local disk or an object store (``gs://``, any URL ``etils.epath`` opens).

A work dir may be a local folder or a URL. Local paths are made absolute; URLs are kept as they
are (never ``os.path``-joined into a local ``./gs:/...`` folder). A write is atomic on both: a
local file is written beside its target and renamed over it; an object store replaces an object
whole in one upload, so readers see the old object or the new one, never a part. Every atomic
write of cgjax goes through :func:`write_files` (a file: :func:`write_file`, :func:`write_bytes`,
:func:`write_text`, :func:`write_json`); a whole output folder through :func:`atomic_dir`, which
refuses to replace a folder cgjax did not write (:func:`check_output_dir`, :data:`OUTPUT_MARKER`).
:func:`check_reachable` fails within seconds, naming the URL, when a store cannot be reached.

orbax (tensorstore) opens ``gs://`` itself; gcsfs (behind ``epath``) reaches a GCS-compatible
emulator with ``STORAGE_EMULATOR_HOST``, tensorstore with ``TENSORSTORE_GCS_HTTP_URL``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

# gcsfs's bucket-type probe (hierarchical namespace) stalls for a minute against emulators and
# answers nothing cgjax needs: off unless the user turned it on.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from etils import epath  # noqa: E402

from cgjax import failpoints  # noqa: E402

__all__ = ["is_url", "resolve", "join", "Path", "exists", "isdir", "makedirs", "read_text", "write_text",
           "write_bytes", "write_json", "write_file", "write_files", "upload_tree", "check_reachable", "keep_lines",
           "append_lines", "localize", "OUTPUT_MARKER", "OVERWRITE_HELP", "check_output_dir", "atomic_dir",
           "replace_dir", "remove_stale_temporaries"]


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
    """An absolute local path, or the URL unchanged."""
    path = os.fspath(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    base = os.fspath(base)
    if is_url(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def Path(path: str | os.PathLike) -> epath.Path:  # noqa: N802 - a constructor
    return epath.Path(resolve(path))


def exists(path: str | os.PathLike) -> bool:
    return os.path.exists(path) if not is_url(path) else Path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) if not is_url(path) else Path(path).is_dir()


def makedirs(path: str | os.PathLike) -> None:
    if is_url(path):
        Path(path).mkdir(parents=True, exist_ok=True)  # object stores have no folders: cheap
    else:
        os.makedirs(path, exist_ok=True)


def read_text(path: str | os.PathLike) -> str:
    if not is_url(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return Path(path).read_text()


def write_files(files: Sequence[tuple[str | os.PathLike, Callable[[str], None]]]) -> None:
    """``write(local_tmp_path)`` for every ``(path, write)``; once all are written, each file is put
    at its ``path`` atomically (rename, or one upload), in the order given. A failed ``write``
    leaves every target as it was. Temporary files get the user's umask (not ``mkstemp``'s 0600)."""
    staged: list[tuple[str, str, str | None]] = []  # (temporary, target, local folder or None)
    try:
        for path, write in files:
            path = os.fspath(path)
            local_dir = os.path.dirname(os.path.abspath(path)) if not is_url(path) else None
            if local_dir:
                os.makedirs(local_dir, exist_ok=True)
            if local_dir:
                remove_stale_temporaries(path)
            fd, tmp = tempfile.mkstemp(dir=local_dir, prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-")
            os.close(fd)
            staged.append((tmp, path, local_dir))
            write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for tmp, path, local_dir in staged:
            failpoints.hit("before_rename:" + os.path.basename(path))
            if local_dir:
                os.chmod(tmp, 0o666 & ~umask)
                os.replace(tmp, path)
            else:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "rb") as f:
                    Path(path).write_bytes(f.read())
    finally:
        for tmp, _, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Removes the temporaries a killed writer left beside the local file ``path``
    (``.NAME.tmp-PID-...`` whose process is gone, or of the pid-less older form); -> their names.
    Only the process that owns a file writes it, so a live pid's temporary is another writer's."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    prefix = f".{name}.tmp-"
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for n in names:
        if not n.startswith(prefix):
            continue
        pid = n[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _alive(int(pid))):
            continue
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, n))
            removed.append(n)
    return removed


def write_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(local_tmp_path)`` then put the file at ``path`` atomically (:func:`write_files`)."""
    write_files([(path, write)])


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    write_file(path, write)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` as UTF-8, as it is (no newline translation)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """``obj`` as JSON (non-ASCII kept as it is) and a final newline."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def upload_tree(local_dir: str, dest: str | os.PathLike) -> None:
    """Copy the files under ``local_dir`` to ``dest`` (a URL or a local folder), keeping the layout."""
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        for name in files:
            target = join(dest, *(p for p in rel.split(os.sep) if p not in ("", ".")), name)
            if is_url(dest):
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                with open(os.path.join(root, name), "rb") as f:
                    Path(target).write_bytes(f.read())
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(os.path.join(root, name), target)


def check_reachable(path: str | os.PathLike, timeout_s: float = 20.0, *, write: bool = True) -> None:
    """For a URL: list it (and, with ``write``, put and remove a probe object) within ``timeout_s``;
    otherwise an ``OSError`` that names the URL and what went wrong. Local paths pass."""
    path = os.fspath(path)
    if not is_url(path):
        return
    scheme = path.split("://", 1)[0]
    result: list[BaseException | None] = []

    def probe():
        try:
            p = Path(path)
            p.mkdir(parents=True, exist_ok=True)
            p.exists()
            if write:
                marker = p / ".cgjax-write-probe"
                marker.write_text("ok")
                marker.unlink()
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - reported below, with the URL
            result.append(e)

    t = threading.Thread(target=probe, daemon=True)  # a hung client must not keep the process alive
    t.start()
    t.join(timeout_s)
    if not result:
        raise OSError(f"{path}: no answer from the {scheme}:// store within {timeout_s:.0f} s (is the server "
                      "reachable, are credentials set?); nothing was written")
    if result[0] is not None:
        e = result[0]
        raise OSError(f"{path}: cannot be opened for writing: {type(e).__name__}: {e}") from e


def keep_lines(path: str | os.PathLike, keep: Callable[[str], bool]) -> None:
    """Rewrite a line file keeping the lines ``keep(line)`` accepts (absent file: nothing)."""
    if not exists(path):
        return
    lines = read_text(path).splitlines(keepends=True)
    kept = [ln for ln in lines if keep(ln)]
    if len(kept) != len(lines):
        write_text(path, "".join(kept))


def append_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Append lines: in place on a local disk; on an object store the object is rewritten whole."""
    lines = list(lines)
    if not lines:
        return
    if not is_url(path):
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(lines)
        return
    old = read_text(path) if exists(path) else ""
    write_text(path, old + "".join(lines))


def localize(folder: str | os.PathLike, names: Iterable[str]) -> str:
    """``folder`` itself when local; for a URL, a local temporary folder holding those of ``names``
    that exist there (for readers that need a local path: tokenizers, processor configs)."""
    folder = os.fspath(folder)
    if not is_url(folder):
        return folder
    local = tempfile.mkdtemp(prefix="cgjax-localized-")
    for name in names:
        src = Path(join(folder, name))
        if src.exists():
            with open(os.path.join(local, name), "wb") as f:
                f.write(src.read_bytes())
    return local


# Every folder cgjax writes whole carries this file; a folder without it is the user's, and is
# never replaced unless it is empty or the caller says ``overwrite``.
OUTPUT_MARKER = ".cgjax-output"
OVERWRITE_HELP = ("replace an existing output folder that cgjax did not write (never one that holds the input); "
                  "without it such a folder is refused unless empty")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse to replace ``out_dir`` when cgjax did not write it (no :data:`OUTPUT_MARKER`) and it
    is not empty, unless ``overwrite``; refuse always when it is one of ``inputs`` or holds one."""
    out = os.path.realpath(os.fspath(out_dir))
    for src in inputs:
        if src and _inside(os.path.realpath(os.fspath(src)), out):
            raise ValueError(f"output {out_dir} is the input {src} or a folder above it: writing there would "
                             "delete what is read; choose another output folder")
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise FileExistsError(f"output {out_dir} exists and is not a folder; it is left as it is")
    entries = sorted(os.listdir(out))
    if not entries or OUTPUT_MARKER in entries or overwrite:
        return
    shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
    raise FileExistsError(f"output {out_dir} already exists and was not written by cgjax (it has no "
                          f"{OUTPUT_MARKER}; it holds {shown}); refusing to replace it: choose a new or empty "
                          "folder, or pass --overwrite to replace it whole")


def _remove_stale_temporaries(out_dir: str) -> None:
    """Remove the temporary folders a killed writer of ``out_dir`` left beside it."""
    parent, name = os.path.dirname(out_dir), os.path.basename(out_dir)
    for entry in os.listdir(parent):
        if entry.startswith((f".{name}.tmp-", f".{name}.old-")):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False,
               inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[str]:
    """``with atomic_dir(out) as tmp:`` write into ``tmp`` (a fresh folder beside ``out``); on a
    clean exit it replaces ``out`` whole (:func:`replace_dir`), on an error it is removed, so
    nothing half-written is ever at ``out``. ``out`` is checked first (:func:`check_output_dir`)
    and gets the :data:`OUTPUT_MARKER`; temporaries of an earlier killed writer are removed."""
    if is_url(out_dir):  # never a local "gs:" folder
        raise ValueError(f"{out_dir}: whole output folders are written to a local disk; write it there and copy it "
                         "to the bucket (e.g. gcloud storage cp -r)")
    check_output_dir(out_dir, overwrite=overwrite, inputs=inputs)
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(out_dir) + ".tmp-")
    try:
        yield tmp
        with open(os.path.join(tmp, OUTPUT_MARKER), "w", encoding="utf-8") as f:
            json.dump({"written_by": "cgjax"}, f)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; give the folder the usual mode
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Move a finished temporary folder to ``out_dir``, replacing an old ``out_dir`` whole."""
    tmp, out_dir = os.fspath(tmp), os.fspath(out_dir)
    if os.path.exists(out_dir):
        trash = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)),
                                 prefix="." + os.path.basename(out_dir) + ".old-")
        os.rename(out_dir, os.path.join(trash, "old"))
        os.rename(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)
