"""Where artifacts live. A stage writes into a private temporary directory and publishes it with one
atomic rename, so a reader sees either nothing or the whole result, never half of it.

$FARM_STORAGE names the store: a local or NFS directory (default $FARM_HOME/storage), or an fsspec URL
such as s3://bucket/prefix (options as JSON in $FARM_STORAGE_OPTIONS, e.g. {"endpoint_url": ...};
credentials the usual AWS way). Stages always work in a local directory; with a remote store that is
a node-local cache ($FARM_HOME/cache/<store>), and publishing also uploads:

    <store>/stages/<name>/<payload-id>/<files>   every file of the stage, under a fresh id per writer
    <store>/stages/<name>/COMPLETE.json          {"payload": id, "files": {path: sha256}}, written last

One PUT of COMPLETE.json makes a stage visible (object stores have no directory rename). The first writer
wins (the first rename; the first COMPLETE.json, written only if absent): a loser discards its output and
takes the winner's, so a caller gets what the store holds. A node fetching a stage checks every file's
sha256. Stages are fsynced before their rename, a torn result.json is rebuilt, links out of a stage refused.

Checksums in the bucket stop damage, not a deliberate writer: the driver pins (`pins`: sha256 of each COMPLETE.json
it first saw) what nodes fetch (`fetch(name, pin)`); promote is pinned by the cell's MLflow record."""

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
from contextlib import contextmanager, suppress
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
    """A finished stage's result, fetched from the remote store first when this node lacks it. A torn or invalid
    result.json (a crash, a full disk) counts as absent: said, set aside, and the stage fetched or rebuilt."""
    final = stage_dir(name)
    result, problem = _result(final, name)
    if problem:
        print(f"farm: WARNING: {final / 'result.json'} {problem}; setting the stage aside to rebuild it", flush=True)
        _set_aside(final)
    if result is None and url() and _marker(name) is not None:
        fetch(name, pin)
        result, problem = _result(final, name)
        if problem:
            _set_aside(final)
            raise FarmError(f"{url()}/stages/{name}: its result.json {problem} — delete that stage there and rerun")
    return result


def _result(final: Path, name: str) -> tuple[dict | None, str | None]:
    """(the result, None); (None, None) when the stage is absent; (None, what is wrong with it)."""
    if not final.is_dir():
        return None, None
    try:
        result = json.loads((final / "result.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "is missing"
    except ValueError as e:  # UnicodeDecodeError too
        return None, f"is torn or not JSON ({e})"
    if not isinstance(result, dict) or result.get("stage") != name or "kind" not in result:
        return None, f"does not name its stage {name} and kind"
    return result, None


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

    fs, path = fsspec.core.url_to_fs(url(), **_options())
    return fs, path.rstrip("/")


OPTIONS_FILE = "storage-options.json"


def _options() -> dict:
    """$FARM_STORAGE_OPTIONS, else $FARM_HOME/storage-options.json, readable by its owner only: they may hold
    credentials, so a Ray job is not sent them (its environment shows in the dashboard; farm/run/jobs.py)."""
    raw, path = os.environ.get("FARM_STORAGE_OPTIONS"), home() / OPTIONS_FILE
    if raw is None and path.is_file():
        if path.stat().st_mode & 0o077:
            raise FarmError(f"{path} holds the store's options, perhaps credentials, and others may read it: "
                            f"chmod 600 {path}")
        raw = path.read_text()
    return json.loads(raw or "{}")


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
    """Publish a finished local stage to the remote store, unless another writer did first; either way this
    node's copy is then the store's (its caller reads what the store holds). Returns the digest of the
    manifest the store holds (what the driver pins readers to)."""
    if not url():
        return None
    held = _marker_bytes(name)
    held = _put(name) if held is None else held
    local, files = stage_dir(name) / "result.json", json.loads(held).get("files")
    if not (local.is_file() and isinstance(files, dict) and sha256(local) == files.get("result.json")):
        _set_aside(stage_dir(name))  # not the store's copy (result.json differs with every run): take that
        fetch(name, hashlib.sha256(held).hexdigest())
    return hashlib.sha256(held).hexdigest()


def _put(name: str) -> bytes:
    """Upload this node's copy, a fresh payload id, then COMPLETE.json only if absent (If-None-Match: *, which
    S3 honours) and read it back (a store ignoring the condition: the last writer's stands); returns the
    manifest the store holds. If it is another writer's, this payload is deleted."""
    fs, base = _fs()
    local = stage_dir(name)
    refuse_links_out(local)
    payload = f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
    files = {}
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = f.relative_to(local).as_posix()
        fs.put_file(str(f), f"{base}/stages/{name}/{payload}/{rel}")
        files[rel] = sha256(f)
    raw = json.dumps({"payload": payload, "files": files}).encode()
    try:
        fs.pipe_file(f"{base}/stages/{name}/COMPLETE.json", raw, mode="create")
    except OSError:  # FileExistsError: another writer's came first (409/412: one is being written right now)
        if _marker_bytes(name) is None:
            raise
    held = _marker_bytes(name)
    if held != raw:
        fs.rm(f"{base}/stages/{name}/{payload}", recursive=True)
    return held


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


def refuse_links_out(tree: Path, within: Path | None = None) -> None:
    """A symbolic link under `tree` must resolve inside `within` (default: the tree): one pointing out would put
    what it points at into the store (a copy, an upload or a reader follows it). One inside is kept."""
    root = Path(within or tree).resolve()
    for d, dirs, files in os.walk(tree):
        for p in (Path(d, n) for n in dirs + files):
            if p.is_symlink() and not p.resolve().is_relative_to(root):
                raise FarmError(f"{p} is a symbolic link to {os.readlink(p)}, outside {within or tree}: refusing to "
                                "put what it points at into the store; copy the file in instead")


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a model directory into a stage: links in it as content, one out refused (a hub snapshot's blobs: in)."""
    refuse_links_out(src, Path(src).parent.parent if Path(src).parent.name == "snapshots" else src)
    shutil.copytree(src, dst, dirs_exist_ok=True)


def discard(name: str) -> None:
    """Remove a stage here and from the remote store: a result that must not stand (the next run replaces it)."""
    _set_aside(stage_dir(name))
    if url():
        fs, base = _fs()
        with suppress(FileNotFoundError):
            fs.rm(f"{base}/stages/{name}", recursive=True)


def _set_aside(path: Path) -> None:
    """Rename a stage away (readers see it whole or not at all) and delete it (if killed: _remove_stale)."""
    aside = path.parent / f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-aside-{uuid.uuid4().hex[:8]}"
    with suppress(FileNotFoundError):
        os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync(path: str | Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(tree: Path) -> None:
    """Every file and directory of a tree on disk (a crash then leaves a published stage whole, not empty)."""
    for d, _, files in os.walk(tree):
        for p in (os.path.join(d, n) for n in files):
            if not os.path.islink(p):  # a link's target is a file of the tree (refuse_links_out), synced itself
                _fsync(p)
        _fsync(d, os.O_RDONLY | os.O_DIRECTORY)


def _remove_stale(final: Path) -> None:
    """Temporary directories left by a writer on this host that was killed (its pid is gone)."""
    host = socket.gethostname()
    for tmp in final.parent.glob(f".{final.name}.tmp-{host}-*"):
        pid = tmp.name.split(f".tmp-{host}-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()  # Linux, as every node is


@contextmanager
def publishing(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success fsync it and rename it to `final` atomically.
    First writer wins: if `final` exists by then, this output is discarded and the caller reads theirs.
    The directory's name carries host and pid, so what a killed writer left is recognised and removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    prefix = f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        yield tmp
        refuse_links_out(tmp)
        if not final.exists():
            _sync_tree(tmp)
            try:
                os.replace(tmp, final)
                _fsync(final.parent, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:  # ENOTEMPTY: another writer renamed theirs in just now
                if not tmp.exists() or not final.is_dir():
                    raise
        shutil.rmtree(tmp, ignore_errors=True)  # what lost the race: theirs stands
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
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
