"""Results on disk: every JSON carries where it came from.

`save_results` stamps a payload with the device, versions, git commit, config and seed, so a
figure can be traced to what made it. `write_metrics` is the last cell of every notebook:
the runner and the notebook tests read `run_dir/metrics.json`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import secrets
from collections.abc import Iterator
from typing import Any


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class WriteError(OSError):
    """A file could not be written (disk full, no permission); the previous file at that path is intact."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A temp file in `path`'s folder to write; renamed onto `path` when the block ends, removed if it
    raises: a crash or an exception mid-write leaves the previous file at `path` intact.

    The file gets the mode any new file gets (0644 under the usual umask 022). An OSError (disk full,
    no permission) becomes a one-line `WriteError` naming `path`.
    """
    path = pathlib.Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, unlike mkstemp
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            kept = "the previous file there is intact" if path.exists() else "nothing was written there"
            raise WriteError(f"could not write {path}: {err.strerror or err}; {kept} "
                             f"(free disk space or fix the folder's permissions, then run again)") from err
        raise


def write_json(path: str | os.PathLike, payload: Any) -> pathlib.Path:
    """Write JSON atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    return pathlib.Path(path)


def save_results(path: str | os.PathLike, results: Any, *, config: Any = None, seed: int | None = None,
                 device: str = "auto") -> pathlib.Path:
    """`{"environment": ..., "config": ..., "seed": ..., "results": ...}` written to `path`."""
    from .env import environment_report  # imports torch: keep `write_json` usable without it (the runner)

    payload = {"environment": environment_report(device), "config": config, "seed": seed, "results": results}
    return write_json(path, payload)


def write_metrics(run_dir: str | os.PathLike, metrics: dict) -> pathlib.Path:
    """A notebook's summary numbers -> `run_dir/metrics.json` (read by the runner and tests)."""
    return write_json(pathlib.Path(run_dir) / "metrics.json", metrics)


def load_json(path: str | os.PathLike) -> Any:
    return json.loads(pathlib.Path(path).read_text())
