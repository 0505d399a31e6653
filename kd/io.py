"""kd's files: where its configs live, and atomic writes (a crash leaves the old file or the new one, never half
of one)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd.errors import WriteError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # conf/: one Hydra group per choice
MODEL_ROLES = ("teacher", "student")  # both offered from conf/model/ (kd.launch.configs.register_models)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write: Callable[[Path], None], what: str = "file") -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    A failed write (a full disk: ENOSPC, or any OSError) removes the temporary file, leaves ``path`` as it was
    and raises a ``WriteError`` naming the ``what`` and the cause."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise WriteError.of(path, what, error) from error
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes it 0600 (and some writers replace the file): it should read like any other file.
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if failed_write(error):
            raise WriteError.of(path, what, error) from error
        raise
    return path


def failed_write(error: BaseException) -> bool:
    """An OSError, or a writer's own report of one (torch.save: "file write failed"; safetensors: an IoError)."""
    if isinstance(error, WriteError):
        return False
    if isinstance(error, OSError):
        return True
    text = str(error)
    return "write failed" in text or (type(error).__name__ == "SafetensorError" and "IoError" in text)


def write_json_atomic(path: str | Path, obj: Any, what: str = "file") -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    return write_atomic(path, write, what)
