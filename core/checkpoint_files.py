"""The checkpoint folder mechanics: atomic, verifiable, never unpickled. ``lowmem.checkpoint``
decides what goes in a checkpoint; this module writes, finds, verifies and rotates the folders.

A checkpoint is written into ``checkpoints/.tmp-step-N``, every file fsynced, a manifest with
a SHA-256 per file written last, then the folder renamed to ``step-N``: a folder counts only
once its manifest exists, so a kill at any moment leaves the previous checkpoint usable.
Tensors go to safetensors or to ``torch.save`` files of plain tensors that are read back with
``weights_only=True``; everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from lowmem.errors import CheckpointError
from lowmem.text import first_line

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove temporary folders a killed save left behind. A copy moved aside while its step was
    being saved again goes back if the new copy never arrived."""
    removed = []
    folder = checkpoints_dir(run_dir)
    if folder.is_dir():
        for child in folder.iterdir():
            if not child.name.startswith(TMP_PREFIX):
                continue
            original = folder / child.name.removeprefix(f"{TMP_PREFIX}replaced-")
            if child.name.startswith(f"{TMP_PREFIX}replaced-") and not original.exists():
                os.replace(child, original)
                continue
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders (manifest present), oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / MANIFEST).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def save(run_dir: Path, step: int, writer, keep: int) -> Path:
    """Write checkpoint ``step`` atomically. ``writer(folder)`` writes the files into the
    temporary folder; lowmem then fsyncs, checksums, renames and rotates."""
    return complete(run_dir, step, begin(run_dir, step), writer, keep)


def begin(run_dir: Path, step: int) -> Path:
    """The empty temporary folder checkpoint ``step`` is written into (several processes can
    write into it before ``complete``)."""
    folder = checkpoints_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{TMP_PREFIX}step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def complete(run_dir: Path, step: int, tmp: Path, writer, keep: int) -> Path:
    """``writer(tmp)`` adds the last files; then the manifest, the rename and the rotation. On
    any failure the temporary folder is removed and a ``CheckpointError`` names the file."""
    final = checkpoints_dir(run_dir) / f"step-{step}"
    try:
        writer(tmp)
        files = checksum_files(tmp, step)
        write_manifest(tmp, step, files)
        publish(tmp, final, step)
    except Exception as exc:  # noqa: BLE001 - OSError, safetensors' and torch's own errors alike
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        where = getattr(exc, "filename", None) or str(tmp)
        raise CheckpointError(f"could not write checkpoint {final}: {reason} ({where})") from None
    rotate(run_dir, keep, protect=final)
    return final


# The three stages of a save, separate so the kill -9 and full-disk tests can stop a real save
# between them (tests/fault_injection.py).
def checksum_files(tmp: Path, step: int) -> dict[str, dict[str, Any]]:
    """Fsync every written file and folder; their sizes and SHA-256 for the manifest."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync_file(path)
        files[str(path.relative_to(tmp))] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    for sub in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(sub)
    return files


def write_manifest(tmp: Path, step: int, files: dict[str, dict[str, Any]]) -> None:
    """The manifest, written last: the folder counts as a checkpoint from here on."""
    manifest = tmp / MANIFEST
    manifest.write_text(json.dumps({"step": step, "files": files}, indent=1))
    _fsync_file(manifest)
    _fsync_dir(tmp)


def publish(tmp: Path, final: Path, step: int) -> None:
    """Rename the finished folder into place. The same step saved again (a resumed run stopped
    at once): move the old copy aside first, so some complete copy exists at every moment."""
    replaced = final.parent / f"{TMP_PREFIX}replaced-{final.name}"
    if final.exists():
        os.replace(final, replaced)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def rotate(run_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Keep the newest ``keep`` complete checkpoints; the newest, and ``protect`` (the one just
    written), are never deleted."""
    complete = complete_checkpoints(run_dir)
    for old in complete[: max(0, len(complete) - max(1, keep))]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


def set_aside_newer(run_dir: Path, resumed_from: Path) -> list[Path]:
    """Resuming from an older checkpoint abandons the newer ones (another future of this run):
    rename them out of the way, so rotation and ``latest`` only see this run's, and nothing is deleted."""
    moved: list[Path] = []
    match = _STEP_DIR.match(resumed_from.name)
    if match is None or resumed_from.parent != checkpoints_dir(run_dir):
        return moved
    step = int(match.group(1))
    for checkpoint in complete_checkpoints(run_dir):
        newer = int(checkpoint.name.split("-")[1])
        if newer > step:
            target = checkpoint.with_name(f"abandoned-{checkpoint.name}")
            n = 1
            while target.exists():
                n += 1
                target = checkpoint.with_name(f"abandoned-{n}-{checkpoint.name}")
            os.replace(checkpoint, target)
            moved.append(target)
    return moved


def verify(checkpoint: Path) -> dict[str, Any]:
    """The manifest, after checking every file's size and checksum; raises naming the bad file."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path} is corrupt: {exc}") from None
    for name, meta in manifest["files"].items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupt or truncated (checksum mismatch)")
    return manifest


def find(resume: str, run_dir: Path, warn) -> Path:
    """The checkpoint to resume from.

    ``latest``: the newest complete checkpoint of ``run_dir`` that verifies; a corrupt one is
    named and the previous one used. A folder: that checkpoint (or, for a run folder, its
    newest), which must verify.
    """
    if resume == "latest":
        candidates = complete_checkpoints(run_dir)
        if not candidates:
            raise CheckpointError(f"no complete checkpoint under {checkpoints_dir(run_dir)} to resume from")
        for checkpoint in reversed(candidates):
            try:
                verify(checkpoint)
                return checkpoint
            except CheckpointError as exc:
                warn(f"warning: {exc}; trying the previous checkpoint")
        raise CheckpointError(f"every checkpoint under {checkpoints_dir(run_dir)} is corrupt")
    path = Path(resume)
    if not (path / MANIFEST).is_file() and complete_checkpoints(path):
        path = complete_checkpoints(path)[-1]
    verify(path)
    return path


def save_tensors(path: Path, tensors: Any) -> None:
    """``torch.save`` of plain tensors/containers only: read back with ``weights_only=True``."""
    import torch

    torch.save(tensors, path)


def load_tensors(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any refusal is reported the same way
        raise CheckpointError(f"refusing {path}: it is not plain tensors ({type(exc).__name__})") from None
