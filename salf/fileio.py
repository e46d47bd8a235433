"""Atomic file writes and content fingerprints.

Every result salf writes (plans, traces, metrics, reports) goes through ``write_atomic``: the
bytes land in a temporary file in the same directory, are flushed to disk, then renamed over the
target, so an interrupted run never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

# mkstemp creates files readable by the owner only; results should get the usual permissions.
# The umask can only be read by setting it, so read it once, at import, before any threads start.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Infinity; write them as null so any reader can parse the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(obj: Any) -> str:
    # Round-trip through the default encoder first so numpy values become floats before _finite.
    plain = json.loads(json.dumps(obj, default=_json_default, allow_nan=True))
    return json.dumps(_finite(plain), indent=2, sort_keys=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_atomic(path, to_json(obj))


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (configs, token ids, plan fields)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, default=_json_default, sort_keys=True).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]
