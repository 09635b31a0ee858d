"""Runtimes run in a child process, so a native crash becomes a report instead of a dead Ray worker.

`run_child(argv, ...)` runs `python -X faulthandler <argv>` (the evaluate and bench stages use it). If
the child dies by a signal, the error names the signal, the runtime, what it was doing and, where
they can be had, the top native frames: the child is run once more under gdb (when gdb is installed;
FARM_CRASH_GDB=0 turns this off) and the crashing thread's backtrace is kept, beside the Python
frames faulthandler printed. The message reads e.g.

    llama.cpp crashed (SIGSEGV in ggml_backend_amx_mul_mat) while evaluating gguf Q8_0; see error.txt

and the whole report (stderr, both stacks) travels with the exception into the cell's error.txt.

Every child has a time limit derived from its work (`timeout_for`: tokens through the artifact's bytes, at a
floor far below any CPU's); one that outlives it is killed with everything it started and reported as a hang.
A child dies with its parent (PR_SET_PDEATHSIG): a stage cancelled or a worker killed leaves no runtime behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

from farm.procs import (  # noqa: F401 (a stage's child errors, read through this module too)
    ChildError,
    ChildTimeout,
    artifact_bytes,
    die_with_parent,
    run_tool,
    timeout_for,
)

# frames of the signal machinery itself, not where the fault is
SIGNAL_FRAMES = re.compile(r"^(raise|abort|gsignal|__pthread_kill\w*|pthread_kill|__GI_\w+|__restore_rt|"
                           r"ggml_print_backtrace\w*|ggml_abort|_PyErr\w*|faulthandler\w*)$")
# what a runtime says before it aborts: a failed ggml assertion, an uncaught C++ exception
ASSERTION = re.compile(r"GGML_ASSERT|GGML_ABORT|terminate called|what\(\):")
GDB_TIMEOUT_S = 600


class RuntimeCrash(ChildError):
    """The runtime's process died by a signal."""


class ChildFailed(ChildError):
    """The runtime's process exited with an error (a Python exception in the child)."""


def run_child(argv: list[str], runtime: str, what: str, timeout_s: float) -> str:
    """Run `python -X faulthandler *argv`; return its stdout. `what`: e.g. "evaluating gguf Q8_0"; `timeout_s`:
    its time limit (timeout_for), after which it and every process it started are killed."""
    cmd = [sys.executable, "-X", "faulthandler", *argv]
    res = run_tool(cmd, what, timeout_s, late=f"{runtime} did not finish {what} within {timeout_s:.0f} s and was "
                   "killed (a hang, or a node far slower than expected: FARM_CHILD_TIMEOUT_SCALE raises the limit); "
                   "see error.txt")
    if res.returncode == 0:
        return res.stdout
    if res.returncode < 0:
        sig = signal_name(-res.returncode)
        frames = native_frames(cmd) if gdb_wanted() else []
        where = first_fault_frame(frames)
        assertion = next((ln.strip() for ln in res.stderr.splitlines() if ASSERTION.search(ln)), "")
        msg = f"{runtime} crashed ({sig}{' in ' + where if where else ''}) while {what}"
        if assertion:
            msg += f": {assertion[:300]}"
        report = (f"{msg}\n\ncommand: {' '.join(cmd)}\n\n--- native stack (gdb, crashing thread) ---\n"
                  + ("\n".join(frames) or "(not available: gdb missing, FARM_CRASH_GDB=0, or no crash on the rerun)")
                  + f"\n\n--- stderr (Python frames from faulthandler) ---\n{res.stderr[-8000:]}")
        raise RuntimeCrash(msg + "; see error.txt", report)
    last = next((ln for ln in reversed(res.stderr.splitlines()) if ln.strip()), "no output")
    raise ChildFailed(f"{what} failed ({runtime}, exit {res.returncode}): {last[:500]}",
                      f"command: {' '.join(cmd)}\n\n--- stderr ---\n{res.stderr[-8000:]}")


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def gdb_wanted() -> bool:
    return os.environ.get("FARM_CRASH_GDB", "1") != "0" and shutil.which("gdb") is not None


def native_frames(cmd: list[str], depth: int = 20) -> list[str]:
    """Rerun the command under gdb; the backtrace of the thread that took the signal (or [])."""
    gdb = ["gdb", "-batch", "-nx", "-q", "-ex", "set pagination off", "-ex", "set confirm off",
           "-ex", "handle SIGPIPE nostop noprint pass", "-ex", "run", "-ex", f"bt {depth}", "--args", *cmd]
    try:
        res = subprocess.run(gdb, capture_output=True, text=True, timeout=GDB_TIMEOUT_S)
    except (subprocess.TimeoutExpired, OSError):
        return []
    if "received signal" not in res.stdout:
        return []
    return [ln.strip() for ln in res.stdout.splitlines() if re.match(r"^#\d+\s", ln)]


def frame_function(frame: str) -> str:
    """'#3  0x00007f.. in ggml_backend_amx_mul_mat(ggml_tensor*) () from /x/libggml-cpu.so' -> the name."""
    frame = frame.replace("(anonymous namespace)::", "")
    m = re.match(r"^#\d+\s+(?:0x[0-9a-f]+ in )?([^\s(]+)", frame)
    name = m.group(1) if m else ""
    return "" if name.startswith("??") else name


def first_fault_frame(frames: list[str]) -> str:
    for f in frames:
        name = frame_function(f)
        if name and not SIGNAL_FRAMES.match(name):
            return name
    return ""
