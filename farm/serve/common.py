"""A serving engine as a child process (on 127.0.0.1 unless told otherwise): started, waited for, stopped — and,
when it dies, reported as what it was (the engine, the signal, its last log lines), never as a connection error
of the client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from farm.errors import StageError
from farm.measure.isolate import RuntimeCrash, signal_name
from farm.procs import die_with_parent

READY_TIMEOUT_S = 300


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EngineDied(RuntimeCrash):
    """The engine's process ended while it was being started or used."""


class Server:
    """`with Server(cmd, title, log, ...) as srv:` runs cmd in its own process group, its output in `log`;
    srv.url is ready (GET /health answered 200) on entry; the group is stopped on exit. `api_key`: what its
    clients send as `Authorization: Bearer KEY` (the engine takes it from `env`)."""

    def __init__(self, cmd: list[str], title: str, log: Path, host: str, port: int, env: dict | None = None,
                 cwd: Path | None = None, ready_timeout: float = READY_TIMEOUT_S, api_key: str | None = None):
        self.cmd, self.title, self.log, self.host, self.port = cmd, title, Path(log), host, port
        self.env, self.cwd, self.ready_timeout, self.api_key = env, cwd, ready_timeout, api_key
        self.proc: subprocess.Popen | None = None
        self.url = f"http://{host}:{port}"

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd,
                                         env={**os.environ, **(self.env or {})}, start_new_session=True,
                                         preexec_fn=lambda: die_with_parent(signal.SIGTERM))  # an engine may shut down
        deadline = time.time() + self.ready_timeout
        while time.time() < deadline:
            self.check_alive("starting")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise StageError(f"{self.title} did not answer {self.url}/health within {self.ready_timeout:.0f} s; "
                         f"its log: {self.log}\n{self.tail()}")

    def check_alive(self, doing: str) -> None:
        """Raise EngineDied if the process has ended (a signal is named as such)."""
        if self.proc is None or self.proc.poll() is None:
            return
        code = self.proc.returncode
        how = f"died with {signal_name(-code)}" if code < 0 else f"exited with status {code}"
        msg = f"{self.title} {how} while {doing}"
        raise EngineDied(f"{msg}; its log: {self.log}", f"{msg}\n\ncommand: {' '.join(self.cmd)}\n\n"
                         f"--- log (last lines) ---\n{self.tail(80)}")

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)
        except ProcessLookupError:
            pass


def auth(api_key: str | None) -> dict[str, str]:
    """The header a server started with `api_key` wants (none without one)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def get_text(url: str, timeout: float = 5, api_key: str | None = None) -> str:
    with urllib.request.urlopen(urllib.request.Request(url, headers=auth(api_key)), timeout=timeout) as r:
        return r.read().decode()


def prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {name: value} (labels dropped; farm's engines export no labelled series
    it reads)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name.split("{")[0]] = float(value)
            except ValueError:
                continue
    return out
