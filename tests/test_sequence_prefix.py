"""Evaluation windows start the way the model's tokenizer starts a sequence: with a BOS token for families
that expect one (Llama, Gemma, Mistral: the tiny model's tokenizer adds one), with nothing for those that
do not (SmolLM2, GPT-2). Fed without it, a BOS model's perplexity was mismeasured several-fold."""

import numpy as np
from transformers import AutoTokenizer

from farm.measure.quality import corpus_tokens, sequence_prefix, tokenize_data

DATA = {"files": [], "calib_tokens": 256, "eval_windows": 2, "eval_window_tokens": 32}


def test_windows_start_with_the_tokenizers_bos(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # this tokenizer does add one
    assert sequence_prefix(tok) == [tok.bos_token_id]
    calib, evals = tokenize_data(tok, DATA)
    assert evals.shape == (2, 32) and (evals[:, 0] == tok.bos_token_id).all()
    assert tok.bos_token_id not in evals[:, 1:] and tok.bos_token_id not in calib
    # the text after the BOS continues across windows: nothing of the evaluation text is skipped
    text = np.concatenate([w[1:] for w in evals])
    plain = tok(tokenize_corpus_text(), add_special_tokens=False)["input_ids"][:len(text)]
    assert text.tolist() == plain
    # benchmark prompts are cut from the text without the windows' BOS tokens
    np.save(tmp_path / "eval_tokens.npy", evals)
    np.save(tmp_path / "calib_tokens.npy", calib)
    np.save(tmp_path / "sequence_prefix.npy", np.array(sequence_prefix(tok)))
    prefix, ids = corpus_tokens(tmp_path)
    assert prefix == [tok.bos_token_id] and tok.bos_token_id not in ids and len(ids) == 2 * 31 + 256


def test_a_tokenizer_without_bos_gets_bare_windows(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, add_bos_token=False)
    assert sequence_prefix(tok) == []
    _, evals = tokenize_data(tok, DATA)
    assert evals.shape == (2, 32) and tok.bos_token_id not in evals


def test_an_eos_appending_tokenizer_is_not_mistaken_for_a_prefix(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, add_bos_token=False, add_eos_token=True)
    assert tok("x")["input_ids"][-1] == tok.eos_token_id
    assert sequence_prefix(tok) == []


def tokenize_corpus_text() -> str:
    from farm.inputs.data import split

    return split([])[1]
