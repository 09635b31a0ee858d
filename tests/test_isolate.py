"""A runtime that dies by a signal is reported as a crash: signal, runtime, what it was doing, the native
frame (gdb), the Python frames (faulthandler) — in a real child process that really segfaults."""

import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest

from farm.measure.isolate import (
    ChildFailed,
    ChildTimeout,
    RuntimeCrash,
    first_fault_frame,
    frame_function,
    run_child,
    timeout_for,
)

SEGFAULT = ["-c", "import ctypes; ctypes.string_at(0)"]  # strlen(NULL) inside libc


def test_a_segfault_names_signal_runtime_and_what_it_was_doing(monkeypatch):
    monkeypatch.setenv("FARM_CRASH_GDB", "0")
    with pytest.raises(RuntimeCrash) as e:
        run_child(SEGFAULT, "llama.cpp", "evaluating gguf Q8_0", 60)
    msg = str(e.value)
    assert msg.startswith("llama.cpp crashed (SIGSEGV") and "while evaluating gguf Q8_0; see error.txt" in msg
    assert "Fatal Python error: Segmentation fault" in e.value.report  # faulthandler's Python frames
    assert 'File "<string>", line 1' in e.value.report
    again = pickle.loads(pickle.dumps(e.value))  # crosses Ray's process boundary with its report
    assert isinstance(again, RuntimeCrash) and str(again) == msg and again.report == e.value.report


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
def test_the_native_frame_comes_from_gdb(monkeypatch):
    monkeypatch.setenv("FARM_CRASH_GDB", "1")
    with pytest.raises(RuntimeCrash) as e:
        run_child(SEGFAULT, "OpenVINO", "benchmarking openvino int8", 60)
    assert "OpenVINO crashed (SIGSEGV in " in str(e.value) and "strlen" in str(e.value), str(e.value)
    assert "--- native stack (gdb, crashing thread) ---\n#0" in e.value.report


def test_a_python_error_in_the_child_is_its_last_line():
    with pytest.raises(ChildFailed) as e:
        run_child(["-c", "raise ValueError('amx: true but no AMX here')"], "llama.cpp", "evaluating gguf Q4_0", 60)
    assert "evaluating gguf Q4_0 failed (llama.cpp, exit 1): ValueError: amx: true but no AMX here" == str(e.value)


def test_a_clean_child_returns_its_stdout():
    assert run_child(["-c", "print('ok')"], "PyTorch", "evaluating torch fp32", 60).strip() == "ok"


def test_frames_are_read_past_the_signal_machinery():
    frames = ["#0  __pthread_kill_implementation (no_tid=0, signo=6) at ./nptl/pthread_kill.c:44",
              "#1  0x00007f3a in raise () from /lib/x86_64-linux-gnu/libc.so.6",
              "#2  0x00007f3b in abort () from /lib/x86_64-linux-gnu/libc.so.6",
              "#3  0x00007f3c in ggml_abort () from /venv/llama_cpp/lib/libggml-base.so",
              ("#4  0x00007f3d in ggml_backend_amx_mul_mat(ggml_compute_params const*, ggml_tensor*) () from "
               "/venv/llama_cpp/lib/libggml-cpu-sapphirerapids.so")]
    assert first_fault_frame(frames) == "ggml_backend_amx_mul_mat"
    assert frame_function("#0  0x0000 in ?? ()") == ""
    assert frame_function("#2  0x1 in (anonymous namespace)::tinyBLAS<16>::gemm(long) () from x.so") == "tinyBLAS<16>::gemm"


def test_a_child_that_hangs_is_killed_at_its_time_limit_with_what_it_started():
    hang = ["-c", "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(600)']); print(p.pid, flush=True); time.sleep(600)"]
    t0 = time.monotonic()
    with pytest.raises(ChildTimeout, match="did not finish evaluating gguf Q8_0 within 2 s and was killed") as e:
        run_child(hang, "llama.cpp", "evaluating gguf Q8_0", 2)
    assert time.monotonic() - t0 < 30
    assert "command:" in e.value.report


def test_a_tool_that_hangs_is_killed_at_its_time_limit():
    """A converter or model builder (llama.cpp's convert_hf_to_gguf.py, ONNX Runtime GenAI's builder) runs under
    the same limit as a runtime's child: before, an export stage could wait for ever."""
    from farm.procs import run_tool

    t0 = time.monotonic()
    with pytest.raises(ChildTimeout, match="the converter did not finish within 1 s"):
        run_tool([sys.executable, "-c", "import time; time.sleep(600)"], "the converter", 1)
    assert time.monotonic() - t0 < 30
    assert run_tool([sys.executable, "-c", "print('done')"], "the converter", 60).stdout.strip() == "done"


def test_a_child_dies_with_its_parent(tmp_path):
    """The stage's process killed (a cancelled task, an OOM kill): its runtime child goes with it."""
    pidfile = tmp_path / "pid"
    script = tmp_path / "stage.py"
    script.write_text("import sys\nfrom farm.measure.isolate import run_child\n"
                      "code = 'import os, sys, time; open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(600)'\n"
                      "run_child(['-c', code, sys.argv[1]], 'PyTorch', 'sleeping', 600)\n")
    parent = subprocess.Popen([sys.executable, str(script), str(pidfile)])
    for _ in range(300):
        if pidfile.is_file() and pidfile.read_text():
            break
        time.sleep(0.1)
    child = int(pidfile.read_text())
    parent.kill()
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the runtime's child outlived its killed parent")


def test_time_limits_grow_with_the_work_and_the_weights(tmp_path):
    small, big = tmp_path / "small.gguf", tmp_path / "big"
    small.write_bytes(bytes(1 << 20))
    big.mkdir()
    (big / "w.bin").write_bytes(bytes(8 << 20))
    assert timeout_for(small) == timeout_for(big)  # the floor: start-up
    assert timeout_for(big, decode=1000) > timeout_for(small, decode=1000) > timeout_for(small, decode=10)
    assert timeout_for(small, prefill=1600) < timeout_for(small, decode=1600)
