"""A run's unfinished state, so that a run killed at any point continues where it stopped.

The work area of output folder ``results/rec`` is the hidden folder ``results/.rec.locsort-work``
beside it, holding:

- ``manifest.json``: what the run is (recording, parameters, labels, locsort version) and how
  its traces are cut into chunks;
- ``models/``: the trained models (written once training is done, ``state.json`` last);
- ``chunks/NNNNNNN.npz``: one file per finished chunk of the main pass.

Every file is written under a temporary name, flushed to disk and renamed, so a file that
exists is complete. Started again with the same command, a run reuses the models and the
finished chunks; with other inputs or parameters, or with ``--overwrite``, it starts afresh.
The output folder itself appears only when everything is done (one rename), after which the
work area is removed: a finished output never mixes with leftovers of another run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from .errors import LocsortError
from .io import write_atomic

FORMAT = "locsort-work"
VERSION = 1


def work_area_path(out: Path) -> Path:
    return out.parent / f".{out.name}.locsort-work"


def digest(value) -> str:
    """A stable hash of nested dicts / lists / scalars / arrays (a recording's description)."""
    h = hashlib.sha256()

    def feed(v):
        if isinstance(v, dict):
            h.update(b"{")
            for k in sorted(v, key=str):
                feed(str(k))
                feed(v[k])
            h.update(b"}")
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for x in v:
                feed(x)
            h.update(b"]")
        elif isinstance(v, np.ndarray):
            h.update(str((v.dtype.str, v.shape)).encode())
            h.update(
                np.ascontiguousarray(v).tobytes()
                if v.dtype != object
                else repr(v.tolist()).encode()
            )
        else:
            h.update(repr(v).encode())

    feed(value)
    return h.hexdigest()


def recording_identity(recording) -> str:
    """What the recording is: its SpikeInterface description (reader, preprocessing chain,
    file paths) plus the size and modification time of its files: a file changed since the
    interrupted run makes its leftovers unusable."""
    from .io import recording_files

    try:
        description = recording.to_dict(recursive=True)
    except Exception:
        description = repr(recording)
    files = []
    for path in recording_files(description if isinstance(description, dict) else recording):
        try:
            stat = path.stat()
            files.append([str(path), stat.st_size, stat.st_mtime_ns])
        except OSError:
            files.append([str(path), None, None])
    lengths = [recording.get_num_samples(s) for s in range(recording.get_num_segments())]
    return digest({"description": description, "files": files, "lengths": lengths})


class WorkArea:
    """The work area of one output folder; hold it with ``with`` (an exclusive lock: two runs
    writing the same output would corrupt each other)."""

    def __init__(self, out: Path, identity: dict, num_chunks: int, overwrite: bool = False):
        self.path = work_area_path(Path(out))
        self.identity = identity
        self.num_chunks = num_chunks
        self.overwrite = overwrite
        self.resumed = 0  # chunks found finished when the run started
        self._lock = None

    @property
    def chunks_dir(self) -> Path:
        return self.path / "chunks"

    @property
    def models_dir(self) -> Path:
        return self.path / "models"

    def __enter__(self) -> "WorkArea":
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / "lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise LocsortError(
                f"another locsort run is writing {self.path.parent}; "
                "wait for it or choose another --out"
            ) from None
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "identity": self.identity,
            "num_chunks": self.num_chunks,
        }
        if self.overwrite or self._manifest() != manifest:
            for part in (self.chunks_dir, self.models_dir):
                shutil.rmtree(part, ignore_errors=True)
            write_atomic(
                self.path / "manifest.json",
                lambda f: f.write(json.dumps(manifest, indent=1).encode()),
            )
        self.chunks_dir.mkdir(exist_ok=True)
        self.resumed = len(self.finished())
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _manifest(self) -> dict | None:
        try:
            return json.loads((self.path / "manifest.json").read_text())
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------ chunks

    def _chunk_path(self, index: int) -> Path:
        return self.chunks_dir / f"{index:07d}.npz"

    def finished(self) -> set[int]:
        return {
            int(p.stem)
            for p in self.chunks_dir.glob("*.npz")
            if p.stem.isdigit() and int(p.stem) < self.num_chunks
        }

    def save_chunk(self, index: int, result: dict) -> None:
        write_atomic(self._chunk_path(index), lambda f: np.savez(f, **result))

    def load_chunk(self, index: int) -> dict | None:
        """A finished chunk's result, or None if its file is unreadable (then it is re-run)."""
        try:
            with np.load(self._chunk_path(index), allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except Exception:
            self._chunk_path(index).unlink(missing_ok=True)
            return None

    # ------------------------------------------------------------------ models

    def has_models(self) -> bool:
        return (self.models_dir / "state.json").is_file()

    def clear_models(self) -> Path:
        shutil.rmtree(self.models_dir, ignore_errors=True)
        self.models_dir.mkdir()
        return self.models_dir

    def remove(self) -> None:
        self.__exit__()
        shutil.rmtree(self.path, ignore_errors=True)
