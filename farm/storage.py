"""Where artifacts live. A stage writes into a private temporary directory and publishes it with one
atomic rename, so a reader sees either nothing or the whole result, never half of it.

The root is $FARM_STORAGE, else $FARM_HOME/storage, else ~/.cache/farm/storage. Only local (or
NFS-mounted) directories for now; the path is what stages hand each other, never the bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("FARM_HOME", Path.home() / ".cache" / "farm")).expanduser().resolve()


def root() -> Path:
    env = os.environ.get("FARM_STORAGE")
    path = Path(env).expanduser().resolve() if env else home() / "storage"
    path.mkdir(parents=True, exist_ok=True)
    return path


def stage_dir(name: str) -> Path:
    return root() / "stages" / name


def read_result(name: str) -> dict | None:
    f = stage_dir(name) / "result.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _remove_stale(final: Path) -> None:
    """Temporary directories left by a writer on this host that was killed (its pid is gone)."""
    host = socket.gethostname()
    for tmp in final.parent.glob(f".{final.name}.tmp-{host}-*"):
        pid = tmp.name.split(f".tmp-{host}-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def publishing(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success rename it to `final` atomically.
    The directory's name carries host and pid, so what a killed writer left is recognised and removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    prefix = f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        yield tmp
        if final.exists():  # someone else finished the same content first: theirs is as good
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    """Of a file's bytes; of a directory, over its files' relative paths and bytes."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


WEIGHT_SUFFIXES = (".gguf", ".onnx", ".onnx_data", ".data", ".bin", ".safetensors")


def size_mb(path: Path) -> float:
    """A model's size on disk: the file, or a directory's weight and graph files (not its tokenizer or
    config, which every format carries alike; a GGUF file holds its vocabulary, ~1 MB here)."""
    if path.is_file():
        return path.stat().st_size / 1e6
    files = [p for p in path.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".xml")
                                                            and (p.parent / f"{p.stem}.bin").is_file())]
    return sum(p.stat().st_size for p in files) / 1e6
