"""Integration on the embedded SmolLM2-135M-Instruct: the float checkpoint converted from the shipped
Q4_1 GGUF must reproduce the GGUF's own perplexity on the same tokens, and llama.cpp's F16 export of
that checkpoint must match PyTorch."""


import json

import pytest

from farm.inputs.models import embedded_gguf
from farm.measure import quality as evaluate

pytestmark = pytest.mark.integration
DATA = {"files": [], "calib_tokens": 512, "eval_windows": 2, "eval_window_tokens": 256}


@pytest.fixture(scope="module")
def reference(embedded_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    evaluate.build_reference(embedded_dir, DATA, out, threads=2)
    return out


def test_converted_checkpoint_keeps_config(embedded_dir):
    cfg = json.loads((embedded_dir / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0 and cfg["num_hidden_layers"] == 30 and cfg["tie_word_embeddings"]


def test_converted_checkpoint_matches_the_original_gguf(embedded_dir, reference):
    torch_q = evaluate.evaluate("torch", embedded_dir, reference, threads=2)
    gguf_q = evaluate.evaluate("llamacpp", embedded_gguf("smollm2-135m-instruct"), reference, threads=2)
    # same weights (Q4_1 dequantized exactly); llama.cpp multiplies Q4_1 x Q8 activations, hence ~1%
    assert abs(torch_q["perplexity"] / gguf_q["perplexity"] - 1) < 0.02, (torch_q, gguf_q)
    assert gguf_q["top1_agree"] > 0.9 and gguf_q["kl_div"] < 0.02
    assert 5 < torch_q["perplexity"] < 40  # a trained model on English prose, not a broken one


def test_f16_gguf_matches_torch(embedded_dir, reference, tmp_path):
    from farm.export.gguf_export import export

    f16 = export(embedded_dir, {"format": "gguf", "quant": "F16"}, tmp_path)
    q = evaluate.evaluate("llamacpp", f16, reference, threads=2)
    assert q["kl_div"] < 1e-3 and q["top1_agree"] > 0.98
    from farm.runtimes import load

    text = load("llamacpp", f16, threads=2, n_ctx=256).generate("The capital of France is", max_tokens=8)
    assert "Paris" in text


def test_llamacpp_prefill_asks_for_the_last_logits_only_and_agrees_with_the_full_pass():
    """Evaluation reads every position's logits; prefill and step read the last only (as a serving engine does:
    copying a 49k-vocabulary row per prompt token cost 41 % of prefill speed) and must give the same numbers as
    the same evaluation read with every position's row kept. (A one-token step is compared with a one-token
    step: llama.cpp computes a batch of one with other kernels than a longer batch, and on AMD Zen 3 (AVX2) the
    two differ by up to 0.31 in a logit, on this Q4_1 file, enough to change the argmax of this random prompt.)"""
    import numpy as np

    from farm.runtimes import load

    rt = load("llamacpp", embedded_gguf("smollm2-135m-instruct"), threads=2, n_ctx=64)
    ids = list(range(100, 132))
    full = rt.logits(ids)
    assert full.shape[0] == len(ids) and rt.llm._logits_all is False  # back to last-only after the full pass
    last = rt.prefill(ids)
    np.testing.assert_allclose(last, full[-1], rtol=1e-3, atol=1e-3)
    tok = int(np.argmax(last))
    nxt = rt.step(tok)
    rt.llm.reset()  # the same prefill and one-token step, every position's row kept
    rt.llm._logits_all = True
    rt.llm.eval(ids)
    rt.llm.eval([tok])
    kept = np.array(rt.llm.scores[: len(ids) + 1])
    rt.llm._logits_all = False
    np.testing.assert_allclose(last, kept[len(ids) - 1], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(nxt, kept[len(ids)], rtol=1e-3, atol=1e-3)
    assert np.abs(nxt - kept[len(ids) - 1]).max() > 0.1  # step returned the new position's row, not the last one
