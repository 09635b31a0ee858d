#!/usr/bin/env python3
"""Add sha256 hashes to a pip lock (`name==version` lines), so `pip install --require-hashes` installs only
the files these hashes name: every file PyPI publishes for that release (all platforms, read from PyPI's
JSON simple API, PEP 691), plus the files of any local index or find-links directory pip is configured with
here (file:// simple indexes carry the hash in each link; find-links files are hashed). A release with no
known file is an error, not an unhashed line. torch is pinned as `torch==2.13.0+cpu`: PyPI has no such file,
so only the CPU build (find-links here, download.pytorch.org/whl/cpu elsewhere) can match.

    scripts/lock-hashes.py requirements.lock [--index URL ...] [--offline]   (rewrites the file in place)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

PYPI = "https://pypi.org/simple"


def release_of(filename: str) -> tuple[str, Version] | None:
    try:
        if filename.endswith(".whl"):
            name, version, *_ = parse_wheel_filename(filename)
        else:
            name, version = parse_sdist_filename(filename)
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):  # an old, oddly named upload: not a file pip would pick for a pinned version
        return None
    return canonicalize_name(name), version


def pypi_hashes(name: str, version: Version) -> set[str]:
    req = urllib.request.Request(f"{PYPI}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    return {f["hashes"]["sha256"] for f in files if "sha256" in f.get("hashes", {})
            and release_of(f["filename"]) == (name, version)}


def local_hashes(index: str, name: str, version: Version) -> set[str]:
    folder = Path(index.removeprefix("file://"))
    if (folder / "index.html").is_file() or (folder / name).is_dir():  # a simple index
        page = folder / name / "index.html"
    else:  # a find-links directory
        return {hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.glob("*")
                if f.is_file() and release_of(f.name) == (name, version)}
    if not page.is_file():
        return set()
    links = re.findall(r'href="[^"]*/([^/"#]+)#sha256=([0-9a-f]{64})"', page.read_text())
    return {h for filename, h in links if release_of(filename) == (name, version)}


def local_indexes() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         check=False).stdout
    found = re.findall(r"(?:extra-index-url|find-links)='([^']*)'", out)
    return sorted({u for line in found for u in line.split() if u.startswith(("file://", "/"))})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lock", type=Path)
    ap.add_argument("--index", action="append", default=None, help="local file:// simple indexes or find-links "
                    "folders (default: pip's)")
    ap.add_argument("--offline", action="store_true", help="do not ask PyPI (the local indexes only)")
    args = ap.parse_args()
    indexes = local_indexes() if args.index is None else args.index
    out, missing = [], []
    for line in args.lock.read_text().replace("\\\n", " ").splitlines():  # one requirement per line again
        line = line.split("--hash")[0].strip()
        if not line or line.startswith("#"):
            out.append(line)
            continue
        raw_name, _, raw_version = line.partition("==")
        name, version = canonicalize_name(raw_name), Version(raw_version)
        hashes = (set() if args.offline else pypi_hashes(name, version)) | {h for i in indexes for h in local_hashes(i, name, version)}
        if not hashes:
            missing.append(line)
        out.append(" \\\n".join([line, *(f"    --hash=sha256:{h}" for h in sorted(hashes))]))
    if missing:
        print(f"no published file found for: {', '.join(missing)}", file=sys.stderr)
        return 1
    args.lock.write_text("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
