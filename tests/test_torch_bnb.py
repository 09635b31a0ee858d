"""bitsandbytes NF4 and LLM.int8 as PyTorch cells on the tiny model: saved quantized (real size on disk),
loaded back by the torch runtime, measured against the fp32 base."""

import json

import numpy as np
import pytest

from farm import storage
from farm.export import FORMATS
from farm.measure.quality import quality, tokenize_data

DATA = {"files": [], "calib_tokens": 512, "eval_windows": 2, "eval_window_tokens": 64}


@pytest.mark.parametrize("quant", ["nf4", "llm_int8"])
def test_bitsandbytes_level_is_saved_quantized_and_measured(tiny_model_dir, tmp_path, quant):
    from farm.inputs.models import load_tokenizer
    from farm.measure.quality import log_softmax
    from farm.runtimes import load

    out = FORMATS.get("torch").export(tiny_model_dir, {"format": "torch", "quant": quant}, tmp_path, 1)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    assert storage.size_mb(out) < storage.size_mb(tiny_model_dir)
    _, evals = tokenize_data(load_tokenizer(tiny_model_dir), DATA)
    base = load("torch", tiny_model_dir, threads=1, n_ctx=64)
    logits = [base.logits(w.tolist())[:-1] for w in evals]
    base_lp = np.stack([log_softmax(x) for x in logits])
    top1 = np.stack([x.argmax(-1) for x in logits])
    m = quality(load("torch", out, threads=1, n_ctx=64), evals, base_lp, top1)
    assert 0 < m["kl_div"] < 0.5 and m["top1_agree"] > 0.5 and np.isfinite(m["perplexity"]), m
