"""Does a full-precision export reproduce the checkpoint it was exported from? Its logits through its runtime
against the checkpoint's own in PyTorch, on a few windows of the sweep's held-out tokens: mean KL divergence and
top-1 agreement. A converter that silently builds another model (a pruned model whose per-layer attention
pattern a converter rewrites, a config field it drops) fails its export here, with the figures, instead of
being measured and ranked as if it were the checkpoint. Each side runs in its own child process, one after the
other, so the two models are never in memory together.

    python -m farm.measure.fidelity RUNTIME_JSON PATH TOKENS_NPY THREADS OUT_NPY
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from farm.errors import StageError

WINDOWS, TOKENS = 2, 128  # positions compared: enough to see a different model, cheap at every size
# the RMS error of the export's log-probs relative to the spread of its checkpoint's: scale-free, so a random
# test model with near-uniform outputs is judged as a trained one (KL and top-1 are reported beside it)
REL_ERR_MAX = 0.05


def tokens_of(reference: Path) -> np.ndarray:
    evals = np.load(reference / "eval_tokens.npy", mmap_mode="r")
    return np.array(evals[:WINDOWS, :TOKENS], dtype=np.int64)


def log_probs(runtime: dict, path: Path, tokens: np.ndarray, threads: int) -> np.ndarray:
    from farm.measure.quality import log_softmax
    from farm.runtimes import load

    rt = load(runtime, path, threads=threads, n_ctx=tokens.shape[1])
    return np.stack([log_softmax(np.asarray(rt.logits(list(map(int, row))), dtype=np.float32)) for row in tokens])


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    if ref.shape != got.shape:
        raise StageError(f"the export's logits have shape {got.shape}, its checkpoint's {ref.shape}: a different "
                         "vocabulary or sequence handling")
    kl = float((np.exp(ref) * (ref - got)).sum(-1).mean())
    spread = ref - ref.mean(-1, keepdims=True)  # log-probs: the same up to nothing but the model's own scale
    rel = float(np.sqrt(((got - ref) ** 2).mean()) / max(np.sqrt((spread ** 2).mean()), 1e-12))
    return {"fidelity_kl": kl, "fidelity_top1": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "fidelity_rel_err": rel}


def check(checkpoint: Path, runtime: dict, artifact: Path, reference: Path, threads: int, work: Path,
          what: str) -> dict[str, float]:
    """The export against its checkpoint; raises StageError when it is not the same model."""
    from farm.measure.isolate import run_child, timeout_for
    from farm.measure.quality import reference_runtime
    from farm.runtimes import RUNTIMES

    tokens = tokens_of(reference)
    np.save(work / "fidelity_tokens.npy", tokens)
    sides = {}
    for side, rt, path in (("checkpoint", {"name": reference_runtime()}, checkpoint), ("export", runtime, artifact)):
        out = work / f"fidelity_{side}.npy"
        run_child(["-m", "farm.measure.fidelity", json.dumps(rt), str(path), str(work / "fidelity_tokens.npy"),
                   str(threads), str(out)], RUNTIMES.options(rt["name"]).TITLE,
                  f"checking that {what} reproduces its checkpoint", timeout_for(path, prefill=tokens.size))
        sides[side] = np.load(out)
        out.unlink()
    (work / "fidelity_tokens.npy").unlink()
    figures = compare(sides["checkpoint"], sides["export"])
    if not figures["fidelity_rel_err"] <= REL_ERR_MAX:
        raise StageError(f"{what} does not reproduce the checkpoint it was exported from: its log-probs are off by "
                         f"{100 * figures['fidelity_rel_err']:.1f} % of their spread (max {100 * REL_ERR_MAX:.0f} %; KL "
                         f"{figures['fidelity_kl']:.4f}, top-1 agreement {figures['fidelity_top1']:.3f}) on "
                         f"{tokens.size} tokens against PyTorch — the converter built another model (a config field "
                         "it does not carry over, a per-layer pattern it rewrites); not measured")
    return figures


if __name__ == "__main__":
    runtime_, path_, tokens_, threads_, out_ = sys.argv[1:6]
    np.save(out_, log_probs(json.loads(runtime_), Path(path_), np.load(tokens_), int(threads_)))
