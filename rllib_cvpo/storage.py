"""Results on any storage Tune writes to: ``report`` and ``evaluate`` take the URI ``sweep --storage`` used (``s3://``,
``gs://``, ``abfs://``, ... through pyarrow's filesystems, Tune's own layer).

A remote sweep or run directory is mirrored into a local cache: the small files (results, parameters, checkpoint
metadata and manifests) are downloaded, and every other file of a checkpoint becomes a sparse placeholder of its
remote size, so that the local logic (which checkpoints are complete, which is best) runs unchanged without
downloading replay buffers. A checkpoint that is actually loaded is then downloaded whole.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Tuple

SMALL = 1 << 20  # files up to this size are downloaded when mirroring (results, metadata); larger ones are stubs


def is_uri(path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as err:
        raise FileNotFoundError(f"cannot open {uri!r}: {err}") from None


def _cache_dir(uri: str) -> Path:
    root = Path(os.environ.get("RLLIB_CVPO_CACHE", Path(tempfile.gettempdir()) / "rllib_cvpo_cache"))
    return root / hashlib.sha1(uri.encode()).hexdigest()[:16]


def mirror(uri: str) -> Tuple[Path, str]:
    """(local mirror directory, the remote path) of a remote directory; see the module docstring."""
    import pyarrow.fs as pafs

    fs, remote = _filesystem(uri)
    info = fs.get_file_info(remote)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no directory at {uri!r}")
    local = _cache_dir(uri) / Path(remote.rstrip("/")).name
    for entry in fs.get_file_info(pafs.FileSelector(remote, recursive=True)):
        if entry.type != pafs.FileType.File:
            continue
        rel = entry.path[len(remote.rstrip("/")) + 1:]
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_file() and target.stat().st_size == entry.size and target.stat().st_mtime >= (
                entry.mtime.timestamp() if entry.mtime else 0):
            continue
        if entry.size <= SMALL or "/checkpoint_" not in "/" + rel:
            with fs.open_input_stream(entry.path) as src, open(target, "wb") as dst:
                dst.write(src.read())
        else:
            with open(target, "wb") as dst:  # a sparse placeholder of the remote size
                dst.truncate(entry.size)
            (target.parent / f".{target.name}.stub").touch()
    return local, remote


def fetch_checkpoint(uri_root: str, local_root: Path, checkpoint: Path) -> Path:
    """Download a mirrored checkpoint's files whole (replacing the placeholders) and return its local path."""
    import pyarrow.fs as pafs

    fs, remote = _filesystem(uri_root)
    rel = checkpoint.relative_to(local_root).as_posix()
    source = remote.rstrip("/") if rel == "." else f"{remote.rstrip('/')}/{rel}"
    pafs.copy_files(source, str(checkpoint), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    for stub in checkpoint.rglob(".*.stub"):
        stub.unlink()
    return checkpoint


def remote_path(uri_root: str, local_root: Path, local: Path) -> str:
    """The URI of a file or directory of a mirror."""
    base = uri_root.split("?", 1)
    rel = Path(local).relative_to(local_root).as_posix()
    path = base[0].rstrip("/") + ("" if rel == "." else f"/{rel}")
    return path + (f"?{base[1]}" if len(base) > 1 else "")
