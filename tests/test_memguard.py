"""The memory guard stops a process that outgrows its limit, says why, and the retry fails at once."""

import subprocess
import sys

import pytest

from farm.errors import StageError
from farm.run import memguard

pytestmark = pytest.mark.slow
HOG = """
import sys, time
from pathlib import Path
import numpy as np
from farm.run import memguard
with memguard.limit(int(sys.argv[1]) * 2**20, Path(sys.argv[2]), "stage compress:test"):
    blocks = []
    for _ in range(40):  # up to 2 GiB, 50 MiB at a time, touched so that it is resident
        blocks.append(np.ones(50 * 2**20 // 8))
        time.sleep(0.02)
print("survived")
"""


def test_a_process_over_its_limit_is_killed_with_a_reason(tmp_path):
    note = tmp_path / "note.txt"
    res = subprocess.run([sys.executable, "-c", HOG, "400", str(note)], check=False, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == -9 and "survived" not in res.stdout
    text = note.read_text()
    assert "stage compress:test was killed for memory" in text and "over the 0.39 GiB" in text
    used = float(text.split("it used ")[1].split(" GiB")[0])
    assert 0.39 <= used < 1.5  # stopped soon after crossing the line, not at the end of the loop (2 GiB)
    with pytest.raises(StageError, match="killed for memory"):
        memguard.check_note(note)


def test_a_process_within_its_limit_is_left_alone(tmp_path):
    note = tmp_path / "note.txt"
    res = subprocess.run([sys.executable, "-c", HOG, "8000", str(note)], check=False, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "survived" in res.stdout and not note.exists()
    memguard.check_note(note)  # no note: nothing to raise
