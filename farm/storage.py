"""Where artifacts live. A stage writes into a private temporary directory and publishes it with one
atomic rename, so a reader sees either nothing or the whole result, never half of it.

$FARM_STORAGE names the store: a local or NFS directory (default $FARM_HOME/storage), or an fsspec URL
such as s3://bucket/prefix (options as JSON in $FARM_STORAGE_OPTIONS, e.g. {"endpoint_url": ...};
credentials the usual AWS way). Stages always work in a local directory; with a remote store that is
a node-local cache ($FARM_HOME/cache/<store>), and publishing also uploads:

    <store>/stages/<name>/<payload-id>/<files>   every file of the stage, under a fresh id per writer
    <store>/stages/<name>/COMPLETE.json          {"payload": id, "files": {path: sha256}}, written last

One PUT of COMPLETE.json makes a stage visible, so a reader sees a whole payload or none (object stores
have no directory rename; a writer that lost a race leaves an unreferenced payload behind). A node
that needs a stage it does not hold downloads the payload and checks every file's sha256 first.

The checksums sit in the same bucket, so they stop damage, not a deliberate writer. The driver is the
authority: each stage result carries `pins`, the sha256 of every COMPLETE.json its stage and those it
reads from had when the driver first learned of them, and a node fetches a pinned stage only if the
store's manifest is still that one (`fetch(name, pin)`); promote is pinned by the cell's MLflow record.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from farm.errors import FarmError


def home() -> Path:
    return Path(os.environ.get("FARM_HOME", Path.home() / ".cache" / "farm")).expanduser().resolve()


def url() -> str | None:
    """The remote store's URL, or None when storage is a local (or NFS-mounted) directory."""
    env = os.environ.get("FARM_STORAGE", "")
    return env.rstrip("/") if "://" in env and not env.startswith("file://") else None


def root() -> Path:
    """The local directory stages work in: the store itself, or this node's cache of a remote one."""
    env, remote = os.environ.get("FARM_STORAGE"), url()
    if remote:
        path = home() / "cache" / hashlib.sha256(remote.encode()).hexdigest()[:16]
    else:
        path = Path(env.removeprefix("file://")).expanduser().resolve() if env else home() / "storage"
    path.mkdir(parents=True, exist_ok=True)
    return path


def stage_dir(name: str) -> Path:
    return root() / "stages" / name


def read_result(name: str, pin: str | None = None) -> dict | None:
    """A finished stage's result, fetched from the remote store first when this node lacks it."""
    f = stage_dir(name) / "result.json"
    if not f.is_file() and url() and _marker(name) is not None:
        fetch(name, pin)
    return json.loads(f.read_text()) if f.is_file() else None


def location(name: str, rel: str) -> str:
    """Where a stage's file lives in the store, as a URL (for MLflow tags)."""
    marker = _marker(name) if url() else None
    if marker is None:
        return (stage_dir(name) / rel).resolve().as_uri()
    return f"{url()}/stages/{name}/{marker['payload']}/{rel}"


def _split(path: str | Path) -> tuple[str, str] | None:
    """(stage name, relative path) of a path some node's stage produced: <its root>/stages/<name>/<rel>."""
    path = str(path)
    if "/stages/" not in path:
        return None
    name, _, rel = path.rsplit("/stages/", 1)[1].partition("/")
    return name, rel


def uri_of(path: str | Path) -> str:
    """The store's URL of a path some node's stage produced."""
    parts = _split(path) if url() else None
    return location(*parts) if parts else Path(path).resolve().as_uri()


def here(path: str | Path, pins: dict[str, str] | None = None) -> Path:
    """The same stage file on this node: with a remote store, fetched into this node's cache (pinned to
    the manifest digest `pins` holds for its stage, when it holds one)."""
    parts = _split(path) if url() else None
    if parts is None or Path(path).exists() and str(path).startswith(str(root())):
        return Path(path)
    return fetch(parts[0], (pins or {}).get(parts[0])) / parts[1]


def stage_of(path: str | Path) -> str | None:
    """The name of the stage a path some node's stage produced lies in."""
    parts = _split(path)
    return parts[0] if parts else None


def local_path(uri: str, pin: str | None = None) -> Path:
    """The local path of a file:// or store URL (from `uri_of`), fetching its stage first."""
    if uri.startswith("file://"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return Path(url2pathname(urlparse(uri).path))
    store = url()
    if not store or not uri.startswith(f"{store}/stages/"):
        raise FarmError(f"{uri} is not in this machine's store ({store or root()}); set FARM_STORAGE "
                        f"(and FARM_STORAGE_OPTIONS) to the store the sweep used")
    name, _payload, rel = uri.removeprefix(f"{store}/stages/").split("/", 2)
    return fetch(name, pin) / rel


# ---- the remote store (fsspec)
def _fs():
    import fsspec

    options = json.loads(os.environ.get("FARM_STORAGE_OPTIONS") or "{}")
    fs, path = fsspec.core.url_to_fs(url(), **options)
    return fs, path.rstrip("/")


def _marker_bytes(name: str) -> bytes | None:
    fs, base = _fs()
    try:
        return fs.cat_file(f"{base}/stages/{name}/COMPLETE.json")
    except FileNotFoundError:
        return None


def _marker(name: str) -> dict | None:
    raw = _marker_bytes(name)
    return None if raw is None else json.loads(raw)


def manifest_digest(name: str) -> str | None:
    """The sha256 of a stage's COMPLETE.json in the remote store (None: no remote store, or no such stage)."""
    raw = _marker_bytes(name) if url() else None
    return None if raw is None else hashlib.sha256(raw).hexdigest()


def upload(name: str) -> str | None:
    """Publish a finished local stage to the remote store: payload files first, COMPLETE.json last.
    Returns the digest of the manifest the store holds for it (what the driver pins readers to)."""
    if not url():
        return None
    existing = _marker_bytes(name)
    if existing is not None:
        return hashlib.sha256(existing).hexdigest()
    fs, base = _fs()
    local = stage_dir(name)
    payload = f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
    files = {}
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = f.relative_to(local).as_posix()
        fs.put_file(str(f), f"{base}/stages/{name}/{payload}/{rel}")
        files[rel] = sha256(f)
    raw = json.dumps({"payload": payload, "files": files}).encode()
    fs.pipe_file(f"{base}/stages/{name}/COMPLETE.json", raw)
    return hashlib.sha256(raw).hexdigest()


def fetch(name: str, pin: str | None = None) -> Path:
    """Download a stage from the remote store into this node's cache, every file checksummed; with `pin`,
    only if the store's manifest is the one the driver recorded (its sha256)."""
    final = stage_dir(name)
    if final.is_dir():
        return final
    raw = _marker_bytes(name)
    if raw is None:
        raise FarmError(f"stage {name} is not in the store {url()} — rerun the sweep to produce it")
    if pin and hashlib.sha256(raw).hexdigest() != pin:
        raise FarmError(f"{url()}/stages/{name}/COMPLETE.json is not the manifest the sweep recorded when the stage "
                        f"was produced (sha256 {pin[:12]}…): the store was rewritten since — refusing to fetch it; "
                        "delete that stage there and rerun the sweep")
    marker = json.loads(raw)
    fs, base = _fs()
    problems = manifest_problems(marker)
    if problems:
        raise FarmError(f"{url()}/stages/{name}/COMPLETE.json: {'; '.join(problems)} — refusing to fetch it; the "
                        "store was written by something other than farm, delete that stage there and rerun")
    with publishing(final) as tmp:
        for rel, want in marker["files"].items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{base}/stages/{name}/{marker['payload']}/{rel}", str(tmp / rel))
            if sha256(tmp / rel) != want:
                raise FarmError(f"{url()}/stages/{name}/{marker['payload']}/{rel}: checksum mismatch — the store "
                                f"holds a damaged copy; delete {url()}/stages/{name}/ and rerun the sweep")
    return final


def manifest_problems(marker: dict) -> list[str]:
    """A manifest may only name files inside its stage: relative paths without '..', a plain payload name,
    and a sha256 for each (what a store that others can write may hold otherwise, it must not place)."""
    problems = []
    payload, files = marker.get("payload"), marker.get("files")
    if not isinstance(payload, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", payload):
        problems.append(f"payload {payload!r} is not a plain directory name")
    if not isinstance(files, dict):
        return [*problems, "files is not a mapping of path -> sha256"]
    for rel, want in files.items():
        parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
        if not parts or rel.startswith("/") or "\\" in rel or any(p in ("..", ".", "") for p in parts):
            problems.append(f"file {rel!r} is not a path inside the stage")
        if not (isinstance(want, str) and re.fullmatch(r"[0-9a-f]{64}", want)):
            problems.append(f"file {rel!r} has no sha256")
    return problems


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
