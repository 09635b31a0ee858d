"""GQA conversion and sparsity on the tiny in-process model, each against its defining property."""

import json

import numpy as np
import pytest
from tiny_model import VOCAB

from farm.compress import run_method


def calib_tokens(n: int = 1024) -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, size=n)


def test_gqa_mean_pooling_is_exact_when_grouped_heads_agree(tiny_model_dir, tmp_path):
    """If the KV heads of a group already carry the same projection, merging them changes nothing."""
    import torch

    from farm.inputs.models import load_model

    model = load_model(tiny_model_dir)  # 4 query heads, 2 KV heads of 16 dims
    for layer in model.model.layers:
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            w = proj.weight.data.view(2, 16, -1)
            w[1] = w[0]
    same = tmp_path / "same-heads"
    model.save_pretrained(same, safe_serialization=True)
    for f in tiny_model_dir.glob("tokenizer*"):
        (same / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "mqa"
    out.mkdir()
    info = run_method("gqa", same, {"kv_heads": 1}, calib_tokens(), out, 1)
    assert info["kv_heads_after"] == 1 and info["kv_cache_bytes_per_token_fp16_after"] * 2 == \
        info["kv_cache_bytes_per_token_fp16_before"]
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 1
    merged = load_model(out)
    ids = torch.tensor([calib_tokens(32).tolist()])
    with torch.inference_mode():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_gqa_refuses_a_head_count_that_does_not_divide(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="kv_heads=3: the model has 2 KV heads"):
        run_method("gqa", tiny_model_dir, {"kv_heads": 3}, calib_tokens(), tmp_path, 1)


@pytest.mark.parametrize("pattern,criterion", [("unstructured", "magnitude"), ("unstructured", "wanda"),
                                               ("2:4", "wanda")])
def test_sparsity_reaches_its_target_in_the_decoder_blocks(tiny_model_dir, tmp_path, pattern, criterion):
    import torch

    from farm.inputs.models import load_model

    step = {"sparsity": 0.5, "pattern": pattern, "criterion": criterion, "calib_samples": 2, "seq_len": 64}
    info = run_method("sparsify", tiny_model_dir, step, calib_tokens(), tmp_path, 1)
    assert abs(info["sparsity_achieved"] - 0.5) < 0.01
    model = load_model(tmp_path)
    for layer in model.model.layers:
        w = layer.mlp.up_proj.weight.data
        if pattern == "2:4":
            assert int((w.reshape(w.shape[0], -1, 4) == 0).sum(-1).min()) >= 2
    assert float((model.model.embed_tokens.weight == 0).float().mean()) < 0.01  # embeddings untouched
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([calib_tokens(16).tolist()])).logits).all()


def test_wanda_keeps_the_weights_that_outlier_inputs_need():
    """Wanda's point: with a few large input channels, |W|·||X|| loses less of the layer's output than
    |W| alone at the same sparsity."""
    import torch

    from farm.compress.sparsify import mask

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(512, 128, generator=g)
    x[:, :8] *= 20  # outlier channels, as LLM activations have
    norms = x.norm(dim=0)
    err = {}
    for name, score in (("magnitude", w.abs()), ("wanda", w.abs() * norms)):
        pruned = w * mask(score, 0.5, "unstructured")
        err[name] = float(((x @ w.T - x @ pruned.T) ** 2).mean())
    assert err["wanda"] < 0.5 * err["magnitude"], err


def test_mlp_pruning_by_importance_beats_dropping_channels_at_random(tiny_model_dir, tmp_path):
    """Activation-based channel importance: keeping the important half of every MLP changes the model's
    output less than keeping a random half of the same size."""
    import torch

    from farm.compress.prune_mlp import shrink
    from farm.inputs.models import load_model

    calib = calib_tokens(2048)
    step = {"ratio": 0.5, "multiple_of": 32, "calib_samples": 4, "seq_len": 128}
    info = run_method("prune_mlp", tiny_model_dir, step, calib, tmp_path, 1)
    width = json.loads((tiny_model_dir / "config.json").read_text())["intermediate_size"]
    assert (info["intermediate_before"], info["intermediate_after"]) == (width, width // 2)
    assert json.loads((tmp_path / "config.json").read_text())["intermediate_size"] == width // 2
    base, pruned, rand = load_model(tiny_model_dir), load_model(tmp_path), load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    for layer in rand.model.layers:
        shrink(layer.mlp, torch.sort(torch.randperm(width, generator=g)[:width // 2]).values)
    ids = torch.tensor([calib[:256].tolist()])
    with torch.inference_mode():
        ref = base(ids).logits.log_softmax(-1)
        kl = {name: float((ref.exp() * (ref - m(ids).logits.log_softmax(-1))).sum(-1).mean())
              for name, m in (("importance", pruned), ("random", rand))}
    assert kl["importance"] < kl["random"], kl
