"""Quality through the runtime that serves an artifact, on the same tokens and windows for every cell.

The reference stage tokenizes the calibration and evaluation text once with the base tokenizer and
stores the base model's next-token log-probabilities over the evaluation windows. Each cell then feeds
the very same token ids to its own runtime and reports
  perplexity  exp(mean NLL of the next token),
  kl_div      mean KL(base || cell) of the next-token distributions (nats),
  top1_agree  share of positions whose argmax equals the base model's,
and, with the long-context probe (data.long_window_tokens, e.g. 2048), the perplexity of the same long windows
near their start (perplexity_near: the first eval_window_tokens positions) and far into them (perplexity_far: the
second half), so a cell that loses more at long range shows it.

Memory is bounded by one window's logits from the runtime and CHUNK positions of float64 log-probs (the base
log-probs are read from disk as needed), not by positions x vocabulary: a 262k-token vocabulary fits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from farm.inputs.data import split, take_tokens

CHUNK = 64  # positions whose float64 log-probs are held at once


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def sequence_prefix(tokenizer) -> list[int]:
    """What the model's tokenizer puts before any text (a BOS token for Llama, Gemma, Mistral, ...; nothing for
    SmolLM2 or GPT-2): every evaluation window starts with it, so the model sees what it was trained to see."""
    text = "The"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):  # where the text's own tokens start (an EOS may follow them)
        if full[i:i + len(plain)] == plain:
            return [int(t) for t in full[:i]]
    return []


def tokenize_data(tokenizer, data: dict) -> tuple[np.ndarray, np.ndarray]:
    """(calibration ids [calib_tokens], evaluation ids [eval_windows, eval_window_tokens]); each evaluation
    window is the tokenizer's sequence prefix (sequence_prefix) followed by text, fed as is to every runtime."""
    calib_text, eval_text = split(data["files"])
    prefix = sequence_prefix(tokenizer)
    width = data["eval_window_tokens"] - len(prefix)
    calib = tokenizer(calib_text, add_special_tokens=False)["input_ids"]
    evals = tokenizer(eval_text, add_special_tokens=False)["input_ids"]
    calib = np.array(take_tokens(calib, data["calib_tokens"], "calibration"), dtype=np.int64)
    evals = np.array(take_tokens(evals, data["eval_windows"] * width, "evaluation"), dtype=np.int64)
    windows = evals.reshape(data["eval_windows"], width)
    return calib, np.concatenate([np.tile(np.array(prefix, dtype=np.int64), (len(windows), 1)), windows], axis=1)


def long_windows(tokenizer, data: dict) -> np.ndarray | None:
    """The long-context probe's windows [long_windows, long_window_tokens] (sequence prefix, then evaluation text
    after the short windows' tokens), or None when the sweep has no probe."""
    if not data.get("long_window_tokens"):
        return None
    _, eval_text = split(data["files"])
    prefix = sequence_prefix(tokenizer)
    evals = tokenizer(eval_text, add_special_tokens=False)["input_ids"]
    start = data["eval_windows"] * (data["eval_window_tokens"] - len(prefix))
    width = data["long_window_tokens"] - len(prefix)
    ids = np.array(take_tokens(evals[start:], data["long_windows"] * width, "long-context"), dtype=np.int64)
    windows = ids.reshape(data["long_windows"], width)
    return np.concatenate([np.tile(np.array(prefix, dtype=np.int64), (len(windows), 1)), windows], axis=1)


def corpus_tokens(reference: Path) -> tuple[list[int], np.ndarray]:
    """(the sequence prefix, the reference's text tokens: evaluation windows without their prefix, then
    calibration) — what benchmark prompts are cut from."""
    prefix = [int(t) for t in np.load(reference / "sequence_prefix.npy")] \
        if (reference / "sequence_prefix.npy").is_file() else []
    evals = np.load(reference / "eval_tokens.npy")[:, len(prefix):]
    return prefix, np.concatenate([evals.ravel(), np.load(reference / "calib_tokens.npy")])


def reference_runtime() -> str:
    """The runtime of the sweep's baseline (the base model in PyTorch, fp32), which the reference logits come from."""
    from farm.export import BASELINE, FORMATS

    return FORMATS.options(BASELINE["format"]).RUNTIME


def build_reference(model_dir: Path, data: dict, out: Path, threads: int) -> dict:
    """Write calib/eval token ids and the base model's log-probs (and the long-context probe's windows)."""
    from farm.inputs.models import load_tokenizer
    from farm.runtimes import load

    tokenizer = load_tokenizer(model_dir)
    calib, evals = tokenize_data(tokenizer, data)
    longs = long_windows(tokenizer, data)
    np.save(out / "sequence_prefix.npy", np.array(sequence_prefix(tokenizer), dtype=np.int64))
    rt = load(reference_runtime(), model_dir, threads=threads, n_ctx=evals.shape[1])
    logprobs = top1 = None
    for i, w in enumerate(evals):  # window by window into a file: memory O(window x vocab), not O(all)
        logits = rt.logits(w.tolist())[:-1]
        if logprobs is None:
            # log-probs in float16 (KL resolution ~1e-5 nats); the argmax from the float32 logits, exactly
            logprobs = np.lib.format.open_memmap(out / "base_logprobs.npy", mode="w+", dtype=np.float16,
                                                 shape=(len(evals), *logits.shape))
            top1 = np.empty((len(evals), len(logits)), dtype=np.int32)
        for j in range(0, len(logits), CHUNK):
            logprobs[i, j:j + CHUNK] = log_softmax(logits[j:j + CHUNK]).astype(np.float16)
        top1[i] = logits.argmax(-1)
    logprobs.flush()
    del logprobs
    np.save(out / "base_top1.npy", top1)
    np.save(out / "calib_tokens.npy", calib)
    np.save(out / "eval_tokens.npy", evals)
    if longs is not None:
        np.save(out / "long_tokens.npy", longs)
    return {"eval_tokens": int(evals.size), "calib_tokens": int(calib.size),
            "long_tokens": 0 if longs is None else int(longs.size), "sequence_prefix": sequence_prefix(tokenizer)}


def quality(rt, evals: np.ndarray, base_logprobs: np.ndarray, base_top1: np.ndarray) -> dict:
    nll, kl, agree, n = 0.0, 0.0, 0, 0
    for window, base, top1 in zip(evals, base_logprobs, base_top1):
        logits = rt.logits(window.tolist())[:-1]
        targets = window[1:]
        for j in range(0, len(targets), CHUNK):
            lp = log_softmax(logits[j:j + CHUNK])
            b = np.asarray(base[j:j + CHUNK], dtype=np.float64)
            t = targets[j:j + CHUNK]
            nll -= lp[np.arange(len(t)), t].sum()
            kl += (np.exp(b) * (b - lp)).sum()
            agree += int((lp.argmax(-1) == top1[j:j + CHUNK]).sum())
        n += len(targets)
    return {"perplexity": float(np.exp(nll / n)), "kl_div": float(kl / n), "top1_agree": agree / n}


def position_nll(rt, window: np.ndarray) -> np.ndarray:
    """The next-token NLL at every position of one window."""
    logits = rt.logits(window.tolist())[:-1]
    targets = window[1:]
    out = np.empty(len(targets))
    for j in range(0, len(targets), CHUNK):
        lp = log_softmax(logits[j:j + CHUNK])
        out[j:j + CHUNK] = -lp[np.arange(len(lp)), targets[j:j + CHUNK]]
    return out


def long_context(rt, longs: np.ndarray, near: int) -> dict:
    """Perplexity of the long windows over their first `near` positions and over their second half."""
    nll = np.stack([position_nll(rt, w) for w in longs])
    half = longs.shape[1] // 2
    return {"perplexity_near": float(np.exp(nll[:, :near - 1].mean())),
            "perplexity_far": float(np.exp(nll[:, half - 1:].mean()))}


def evaluate(runtime: str | dict, artifact: Path, reference: Path, threads: int) -> dict:
    """Quality of an artifact through a runtime (a name, or {'name': ..., <its options>})."""
    from farm.runtimes import load

    evals = np.load(reference / "eval_tokens.npy")
    base = np.load(reference / "base_logprobs.npy", mmap_mode="r")  # read as needed, never whole
    top1 = np.load(reference / "base_top1.npy")
    longs = np.load(reference / "long_tokens.npy") if (reference / "long_tokens.npy").is_file() else None
    rt = load(runtime, artifact, threads=threads, n_ctx=max(evals.shape[1], 0 if longs is None else longs.shape[1]))
    metrics = quality(rt, evals, base, top1)
    if longs is not None:
        metrics.update(long_context(rt, longs, evals.shape[1]))
    return metrics


def evaluate_isolated(runtime: dict, artifact: Path, reference: Path, threads: int, out_json: Path,
                      what: str = "") -> dict:
    """`evaluate` in a child process (metrics written to out_json): a runtime that crashes is reported as
    a crash, with its signal and native frame (farm.isolate), not as a lost Ray worker."""
    import json

    import numpy as np

    from farm.measure.isolate import run_child, timeout_for
    from farm.runtimes import RUNTIMES

    tokens = sum(np.load(reference / f, mmap_mode="r").size for f in ("eval_tokens.npy", "long_tokens.npy")
                 if (reference / f).is_file())
    run_child(["-m", "farm.measure.quality", json.dumps(runtime), str(artifact), str(reference), str(threads),
               str(out_json)], RUNTIMES.options(runtime["name"]).TITLE, f"evaluating {what or runtime['name']}",
              timeout_for(artifact, prefill=tokens))
    return json.loads(out_json.read_text())


if __name__ == "__main__":  # python -m farm.measure.quality RUNTIME_JSON ARTIFACT REFERENCE THREADS OUT_JSON
    import json
    import sys

    runtime_, artifact_, reference_, threads_, out_ = sys.argv[1:6]
    metrics_ = evaluate(json.loads(runtime_), Path(artifact_), Path(reference_), int(threads_))
    Path(out_).write_text(json.dumps(metrics_))
