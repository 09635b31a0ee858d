"""The long-context probe (perplexity near the start of long windows and far into them) and the evaluation's
memory, bounded by a chunk of positions rather than positions x vocabulary."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from transformers import AutoTokenizer

from farm.errors import FarmError, SpecError
from farm.measure.quality import long_context, long_windows, quality, tokenize_data
from farm.sweep import spec

DATA = {"files": [], "calib_tokens": 256, "eval_windows": 2, "eval_window_tokens": 32, "long_window_tokens": 128,
        "long_windows": 2}


class Peaked:
    """A runtime that predicts the next token of a known text with probability ~1; past `far_from` positions
    (a cell that loses its way at long range) it predicts uniformly."""

    def __init__(self, text: np.ndarray, vocab: int, far_from: int | None = None):
        self.text, self.vocab, self.far_from = text, vocab, far_from

    def logits(self, tokens: list[int]) -> np.ndarray:
        out = np.zeros((len(tokens), self.vocab), dtype=np.float32)
        for i in range(len(tokens) - 1):
            if self.far_from is None or i < self.far_from:
                out[i, tokens[i + 1]] = 30.0
        return out


def test_long_windows_follow_the_short_ones_and_start_with_the_prefix(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    _, evals = tokenize_data(tok, DATA)
    longs = long_windows(tok, DATA)
    assert longs.shape == (2, 128) and (longs[:, 0] == tok.bos_token_id).all()
    assert longs[0, 1:4].tolist() != evals[0, 1:4].tolist()  # after the short windows' text, not over it
    assert long_windows(tok, {**DATA, "long_window_tokens": 0}) is None
    with pytest.raises(FarmError, match="long_windows / long_window_tokens"):
        long_windows(tok, {**DATA, "long_windows": 64, "long_window_tokens": 8192})


def test_a_cell_that_loses_its_way_at_long_range_shows_it_far_not_near():
    rng = np.random.default_rng(0)
    longs = rng.integers(0, 50, size=(2, 128))
    good = long_context(Peaked(longs, 50), longs, 32)
    bad = long_context(Peaked(longs, 50, far_from=48), longs, 32)
    assert good["perplexity_near"] == pytest.approx(bad["perplexity_near"])
    assert good["perplexity_far"] < 1.01 and bad["perplexity_far"] == pytest.approx(50, rel=1e-6)


def test_the_probe_is_validated():
    base = "name: t\nexports: [{format: gguf, quant: Q8_0}]\n"
    with pytest.raises(SpecError, match="twice"):
        spec.loads(base + "data: {eval_window_tokens: 256, long_window_tokens: 300}")
    with pytest.raises(SpecError, match="set data.long_window_tokens"):
        spec.loads(base + "constraints: [{metric: perplexity_far, max_ratio_to_baseline: 1.2}]")
    s = spec.loads(base + "data: {long_window_tokens: 2048}\nconstraints: [{metric: perplexity_far, max: 30}]")
    assert s.data.long_windows == 2 and spec.better("perplexity_far") == "min"


def test_evaluation_memory_is_bounded_by_a_chunk_not_by_the_vocabulary(monkeypatch):
    """A 131k vocabulary and 256-token windows: what quality() allocates beyond the runtime's own logits stays a
    few chunks of float64 log-probs (it was window x vocab x float64, several times over)."""
    from farm.measure import quality as evaluate

    chunk = 8
    monkeypatch.setattr(evaluate, "CHUNK", chunk)
    vocab, width = 131072, 256
    rng = np.random.default_rng(0)
    evals = rng.integers(0, vocab, size=(1, width))
    base = np.full((1, width - 1, vocab), -np.log(vocab), dtype=np.float16)
    top1 = np.zeros((1, width - 1), dtype=np.int32)
    rt = Peaked(evals, vocab)
    logits_bytes = width * vocab * 4
    tracemalloc.start()
    m = quality(rt, evals, base, top1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert m["perplexity"] < 1.01
    assert peak < logits_bytes + 8 * chunk * vocab * 8, (peak / 2**20, logits_bytes / 2**20)
    assert peak < 1.5 * logits_bytes  # the old way: > 4x (float64 log-probs, base copy, their product)
