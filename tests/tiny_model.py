"""The tiny in-process model the unit tests compress: a random Llama of 4 blocks (hidden 64, 4 query heads
in 2 KV groups of 16 dims, MLP 512 wide, 0.57 M parameters) with a SentencePiece BPE tokenizer of VOCAB
tokens trained here, in a fraction of a second, on the embedded corpus. Nothing is downloaded or converted.
The MLP is that wide so that weights, not the graph an export writes beside them (~0.3 MB of OpenVINO
XML), make most of an export's size. `train` gives the same model after a few seconds of training on the
calibration text: a teacher whose next-token distribution is peaked and learnable, where the random
model's is close to uniform (a student matches that by doing little).

SentencePiece rather than a byte-level BPE: llama.cpp's converter takes a byte-level BPE only when it
recognises its pre-tokenizer by hashing a known vocabulary's ids, and a tokenizer.json-only Llama
tokenizer does not convert. From tokenizer.model, llama.cpp, sentencepiece and the Hugging Face fast
tokenizer (tokenizer.json) split every paragraph of the corpus the same way; no dummy prefix keeps that
true for text that starts with a space."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

VOCAB = 2048  # 256 byte-fallback pieces, <unk> <s> </s> <pad>, the rest learned


def save_tokenizer(out: Path):
    import sentencepiece as spm
    from transformers import LlamaTokenizerFast

    from farm.inputs.data import documents

    text = "\n\n".join(dict.fromkeys(t for _, t in sorted(documents([]).items())))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        num_threads=1, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    tok = LlamaTokenizerFast(vocab_file=str(out / "tokenizer.model"), pad_token="<pad>", legacy=False,
                             add_prefix_space=False)
    tok.save_pretrained(out)  # tokenizer.json (converted from tokenizer.model), tokenizer_config.json
    return tok


def build(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = save_tokenizer(out)
    assert len(tok) == VOCAB, len(tok)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).eval().save_pretrained(out, safe_serialization=True)
    return out


def train(model_dir: Path, out: Path, steps: int = 200, batch: int = 8, seq_len: int = 64) -> Path:
    """The model after `steps` AdamW steps of next-token cross-entropy on random windows of the embedded
    calibration text (the loss falls from ln(VOCAB) ~ 6.9 to about 4.5)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from farm.inputs.data import split

    calib, _ = split([])
    ids = torch.tensor(AutoTokenizer.from_pretrained(model_dir)(calib, add_special_tokens=False)["input_ids"])
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices of 64: on a busy 2-core machine, 10 s instead of a minute
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - seq_len, (batch,))
            x = torch.stack([ids[s:s + seq_len] for s in starts])
            model(x, labels=x).loss.backward()
            optim.step()
            optim.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(out, safe_serialization=True)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, out / f.name)
    return out
