"""Child processes of a stage (a runtime, a converter, a model builder, a serving engine): each has a time limit
derived from its work and dies with its parent, so no stage waits for ever and nothing outlives its owner."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from farm.errors import StageError

FLOOR_S = 600  # start-up (imports, loading, a tokenizer, lm-eval's task set-up) on the slowest node
BYTES_TOKENS_PER_S = 1e9  # decode steps x artifact bytes per second: 10x below a decode on 2 slow cores
PREFILL_TOKENS_PER_STEP = 16  # prompt tokens run in one batch cost far less each than a decode step (>16x here)


class ChildError(StageError):
    """A runtime's child process failed; `report` (stderr, stacks) becomes the cell's error.txt."""

    def __init__(self, message: str, report: str = ""):
        super().__init__(message)
        self.report = report

    def __reduce__(self):  # crosses Ray's process boundary intact
        return (type(self), (str(self), self.report))


class ChildTimeout(ChildError):
    """The runtime's process did not finish within its time limit and was killed."""


def artifact_bytes(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timeout_for(artifact: Path, decode: int = 0, prefill: int = 0) -> float:
    """Seconds a child running `decode` steps and `prefill` prompt tokens through `artifact` may take (each step
    reads the weights once); FARM_CHILD_TIMEOUT_SCALE multiplies it."""
    scale = float(os.environ.get("FARM_CHILD_TIMEOUT_SCALE", "1"))
    steps = decode + prefill / PREFILL_TOKENS_PER_STEP
    return scale * (FLOOR_S + steps * artifact_bytes(artifact) / BYTES_TOKENS_PER_S)


def timeout_for_conversion(source: Path) -> float:
    """Seconds a converter or builder reading and writing `source`'s weights may take (5 MB/s at the least)."""
    return float(os.environ.get("FARM_CHILD_TIMEOUT_SCALE", "1")) * (FLOOR_S + artifact_bytes(source) / 5e6)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child, before exec: the kernel sends it `sig` when the thread that started it ends, however that ends
    (a killed worker, a cancelled Ray task), so no runtime, tool or engine outlives its owner."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_tool(cmd: list[str], what: str, timeout_s: float, env: dict | None = None,
             late: str | None = None) -> subprocess.CompletedProcess:
    """A tool's process (a converter, a model builder, a runtime's child), its output captured: killed with
    everything it started after `timeout_s` (ChildTimeout, `late` its message if given), and with its parent."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, preexec_fn=die_with_parent)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except BaseException as e:  # late, or interrupted: nothing it started outlives this process
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            raise ChildTimeout(late or f"{what} did not finish within {timeout_s:.0f} s and was killed "
                               "(FARM_CHILD_TIMEOUT_SCALE raises the limit)",
                               f"command: {' '.join(cmd)}\n\n--- stderr ---\n{err[-8000:]}") from None
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
