"""Paths and whole-file writes on a local disk or an object store (``gs://``, any URL ``etils.epath`` opens).

A work dir may be a local folder or a URL. Local paths are made absolute; URLs are kept as they
are (never ``os.path``-joined into a local ``./gs:/...`` folder). A write is atomic on both: a
local file is written beside its target and renamed over it; an object store replaces an object
whole in one upload, so readers see the old object or the new one, never a part.
:func:`check_reachable` fails within seconds, naming the URL, when a store cannot be reached.

orbax (tensorstore) opens ``gs://`` itself; gcsfs (behind ``epath``) reaches a GCS-compatible
emulator with ``STORAGE_EMULATOR_HOST``, tensorstore with ``TENSORSTORE_GCS_HTTP_URL``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from typing import Callable, Iterable

# gcsfs's bucket-type probe (hierarchical namespace) stalls for a minute against emulators and
# answers nothing cgjax needs: off unless the user turned it on.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from etils import epath  # noqa: E402

__all__ = ["is_url", "resolve", "join", "Path", "exists", "isdir", "makedirs", "read_text", "write_text",
           "write_bytes", "write_file", "upload_tree", "check_reachable"]


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


def write_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(local_tmp_path)`` then put the file at ``path`` atomically (rename, or one upload).

    The temporary file gets the user's umask (not ``mkstemp``'s 0600)."""
    path = os.fspath(path)
    local_dir = os.path.dirname(os.path.abspath(path)) if not is_url(path) else None
    if local_dir:
        os.makedirs(local_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local_dir, prefix="." + os.path.basename(path) + ".tmp-")
    os.close(fd)
    try:
        write(tmp)
        if local_dir:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "rb") as f:
                Path(path).write_bytes(f.read())
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    write_file(path, write)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


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
