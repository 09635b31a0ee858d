"""A stage that outgrows the memory it reserved is stopped before it takes the node down.

Ray schedules by the memory a task *asks* for; nothing stops a task from using more, and when the node
runs out Ray's OOM killer picks a victim that may be someone else's stage. With `stage_memory_gb` set,
a watchdog thread samples the stage's resident memory (its process and children, e.g. the llama.cpp
converter) and, past the limit, writes why to a note and kills the worker process. Ray sees a crashed
worker and retries the task once (as for a lost node); the retry finds the note and fails at once with
the reason, so a deterministic overrun is not run twice and its cells are FAILED with a clear message.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from farm.errors import StageError
from farm.storage import atomic_write_text


def rss(proc: psutil.Process) -> int:
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def check_note(note: Path) -> None:
    """Raise the reason an earlier attempt of this stage was stopped, if it was."""
    if note.is_file():
        raise StageError(note.read_text())


@contextmanager
def limit(limit_bytes: int, note: Path, what: str, interval: float = 0.1) -> Iterator[None]:
    proc = psutil.Process()
    done = threading.Event()
    peak = [0]

    def watch() -> None:
        while not done.wait(interval):
            used = rss(proc)
            peak[0] = max(peak[0], used)
            if used > limit_bytes:
                atomic_write_text(note, f"{what} was killed for memory: it used {used / 2**30:.2f} GiB, over the "
                                        f"{limit_bytes / 2**30:.2f} GiB it reserved (stage_memory_gb); raise "
                                        "stage_memory_gb or make the step smaller (batch, seq_len, calib_samples)")
                for child in proc.children(recursive=True):
                    child.kill()
                os.kill(proc.pid, signal.SIGKILL)

    thread = threading.Thread(target=watch, name="farm-memguard", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
