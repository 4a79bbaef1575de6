"""Which checkpoints are complete, and one writer per run directory.

A kill can land anywhere in a save or a rotation. Tune copies each checkpoint file by file from a temporary
directory into ``checkpoint_NNNNNN`` (pyarrow's copy, not a rename) and deletes old checkpoints directory tree by
directory tree, and its experiment state, written every few seconds, may still name a checkpoint that the rotation has
since half deleted. So a checkpoint directory that exists is not necessarily one that can be restored.

CVPO writes ``cvpo_manifest.json`` as the last file of every save: each file's relative path and size, plus the
training iteration. A checkpoint is complete when its manifest parses and every file it lists is there with its size.
``--resume``, ``evaluate``, ``serve`` and ``load_policy`` only ever use complete checkpoints (checkpoints written
before the manifest existed count as complete when ``rllib_checkpoint.json`` parses and the algorithm state exists).

:func:`run_dir_lock` holds an exclusive ``flock`` on a run (or sweep) directory for as long as one command trains in
it, so a second ``--resume`` of a live run is refused instead of writing into the same trial. The kernel drops the
lock when its process dies, however it dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

MANIFEST_FILE = "cvpo_manifest.json"
LOCK_FILE = ".rllib_cvpo.lock"
_INDEX = re.compile(r"checkpoint_(\d+)$")


def write_manifest(checkpoint: str | Path, **info: Any) -> Path:
    """List every file under ``checkpoint`` (relative path -> size) in its manifest, written last and atomically
    (a temporary name, then a rename), with ``info`` (e.g. the training iteration) beside it."""
    root = Path(checkpoint)
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST_FILE and not path.name.startswith(MANIFEST_FILE):
            files[path.relative_to(root).as_posix()] = path.stat().st_size
    target = root / MANIFEST_FILE
    tmp = root / f"{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({"files": files, **info}, indent=0))
    os.replace(tmp, target)
    return target


def read_manifest(checkpoint: str | Path) -> Dict[str, Any]:
    """The manifest's contents ({} when there is none or it is unreadable)."""
    try:
        data = json.loads((Path(checkpoint) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def incomplete_reason(checkpoint: str | Path) -> Optional[str]:
    """None for a complete checkpoint, else what is wrong with it (one short phrase)."""
    root = Path(checkpoint)
    if not root.is_dir():
        return "it does not exist"
    manifest_file = root / MANIFEST_FILE
    if manifest_file.is_file():
        manifest = read_manifest(root)
        files = manifest.get("files")
        if not isinstance(files, dict):
            return f"its {MANIFEST_FILE} is unreadable"
        for rel, size in files.items():
            path = root / rel
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != size:
                return f"{rel} has {path.stat().st_size} of its {size} bytes"
        return None
    marker = root / "rllib_checkpoint.json"
    if not marker.is_file():
        return "rllib_checkpoint.json is missing"
    try:
        json.loads(marker.read_text())
    except (OSError, ValueError):
        return "rllib_checkpoint.json is unreadable"
    if not (root / "algorithm_state.pkl").is_file() and not (root / "algorithm_state.msgpack").is_file():
        return "algorithm_state.pkl is missing"
    return None


def is_complete(checkpoint: str | Path) -> bool:
    return incomplete_reason(checkpoint) is None


def checkpoint_index(checkpoint: str | Path) -> int:
    match = _INDEX.search(Path(checkpoint).name)
    return int(match.group(1)) if match else -1


def complete_checkpoints(trial_dir: str | Path) -> List[Path]:
    """The complete ``checkpoint_NNNNNN`` directories of a trial, oldest first."""
    found = [p for p in Path(trial_dir).glob("checkpoint_*") if p.is_dir() and _INDEX.search(p.name)]
    return sorted((p for p in found if is_complete(p)), key=checkpoint_index)


class CheckpointError(ValueError):
    """A path that is not a readable CVPO checkpoint (or run directory holding one)."""


class RunDirInUse(RuntimeError):
    """Another process is training in this run directory."""


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run directory's lock for the ``with`` block; raise :class:`RunDirInUse` naming the holder's pid if
    another process holds it."""
    import fcntl

    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirInUse(f"{str(root)!r} is in use by another rllib-cvpo process (pid {holder}): wait for it "
                              "to end, or stop it, before resuming") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
