"""Attention-head pruning on the tiny in-process model (4 query heads in 2 KV groups of 2, head_dim 16):
a head that contributes nothing is removed without changing the model; importance beats chance; the
smaller model keeps GQA consistent, saves with an explicit head_dim, and llama.cpp converts and runs it."""

import json

import numpy as np
import pytest
from tiny_model import VOCAB

from farm.compress import run_method

STEP = {"calib_samples": 4, "seq_len": 64}


def calib_tokens(n: int = 1024) -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, size=n)


def with_head_scales(tiny_model_dir, tmp_path, scales: list[float], name: str):
    """The tiny model with every block's o_proj columns of query head h multiplied by scales[h]."""
    from farm.inputs.models import load_model

    model = load_model(tiny_model_dir)
    for layer in model.model.layers:
        w = layer.self_attn.o_proj.weight.data.view(64, 4, 16)
        for h, s in enumerate(scales):
            w[:, h] *= s
    out = tmp_path / name
    model.save_pretrained(out, safe_serialization=True)
    for f in tiny_model_dir.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return model, out


def kl(ref, model, ids) -> float:
    import torch

    with torch.inference_mode():
        p = ref(ids).logits.log_softmax(-1)
        return float((p.exp() * (p - model(ids).logits.log_softmax(-1))).sum(-1).mean())


@pytest.mark.parametrize("importance", ["activation", "gradient"])
def test_removing_heads_that_contribute_nothing_changes_nothing(tiny_model_dir, tmp_path, importance):
    import torch

    from farm.inputs.models import load_model

    model, silent = with_head_scales(tiny_model_dir, tmp_path, [1.0, 0.0, 0.0, 1.0], "silent")  # one per group
    out = tmp_path / "pruned"
    out.mkdir()
    info = run_method("prune_heads", silent, {**STEP, "heads_per_group": 1, "importance": importance},
                                      calib_tokens(), out, 1)
    assert info["kept_heads"] == [[0, 3]] * 4 and (info["heads_after"], info["kv_heads_after"]) == (2, 2)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 2, 16)
    pruned = load_model(out)
    attn = pruned.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 64) and attn.o_proj.weight.shape == (64, 32)
    assert attn.k_proj.weight.shape == (32, 64)  # KV heads untouched
    ids = torch.tensor([calib_tokens(48).tolist()])
    with torch.inference_mode():
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_importance_beats_random_heads_and_whole_groups_go(tiny_model_dir, tmp_path):
    import torch

    from farm.compress.prune_heads import slice_heads
    from farm.inputs.models import load_model

    base, loud = with_head_scales(tiny_model_dir, tmp_path, [0.2, 8.0, 8.0, 0.2], "loud")
    out = tmp_path / "pruned"
    out.mkdir()
    info = run_method("prune_heads", loud, {**STEP, "ratio": 0.5}, calib_tokens(), out, 1)
    assert info["kept_heads"] == [[1, 2]] * 4
    g = torch.Generator().manual_seed(0)
    rand = load_model(loud)
    picks = []
    for layer in rand.model.layers:  # one random head of each group, as GQA needs
        keep = [grp * 2 + int(torch.randint(2, (1,), generator=g)) for grp in range(2)]
        picks.append(keep)
        attn = layer.self_attn
        attn.q_proj, attn.o_proj = slice_heads(attn.q_proj, keep, 16, 0), slice_heads(attn.o_proj, keep, 16, 1)
        attn.num_key_value_groups = 1
    rand.config.num_attention_heads, rand.config.head_dim = 2, 16
    assert picks != info["kept_heads"]
    ids = torch.tensor([calib_tokens(256).tolist()])
    scores = {"importance": kl(base, load_model(out), ids), "random": kl(base, rand, ids)}
    assert scores["importance"] < 0.5 * scores["random"], scores

    groups = tmp_path / "one-group"
    groups.mkdir()
    info = run_method("prune_heads", loud, {**STEP, "kv_heads": 1}, calib_tokens(), groups, 1)
    assert (info["heads_after"], info["kv_heads_after"]) == (2, 1)
    one = load_model(groups)
    assert one.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)
    with torch.inference_mode():
        assert torch.isfinite(one(ids).logits).all()


def test_prune_heads_refuses_to_remove_nothing_or_everything(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="heads_per_group=2: removes no head"):
        run_method("prune_heads", tiny_model_dir, {**STEP, "heads_per_group": 2}, calib_tokens(), tmp_path, 1)
    with pytest.raises(ValueError, match="heads_per_group\n.*must be a positive integer"):  # by its Options
        run_method("prune_heads", tiny_model_dir, {**STEP, "heads_per_group": 0}, calib_tokens(), tmp_path, 1)


def test_spec_tracks_heads_through_the_pipeline():
    from farm.errors import SpecError
    from farm.sweep import spec

    def problems(pipeline):
        try:
            spec.parse({"name": "t", "exports": [{"format": "gguf", "quant": "F16"}], "pipelines": [pipeline]})
        except SpecError as e:
            return e.problems
        return []

    assert problems([{"method": "prune_heads", "heads_per_group": 2}]) == []
    [p] = problems([{"method": "prune_heads", "heads_per_group": 3}])
    assert p.startswith("pipelines[0][0].heads_per_group:") and "3 KV group(s) of 3" in p
    [p] = problems([{"method": "gqa", "kv_heads": 1}, {"method": "prune_heads", "heads_per_group": 9}])
    assert p.startswith("pipelines[0][1].heads_per_group:") and "1 KV group(s) of 9" in p
    [p] = problems([{"method": "prune_heads", "heads_per_group": 2}, {"method": "prune_heads", "ratio": 0.9}])
    assert p.startswith("pipelines[0][1].ratio:") and "of 2" in p
    [p] = problems([{"method": "prune_heads", "kv_heads": 3}])
    assert p.startswith("pipelines[0][0].kv_heads:")
    [p] = problems([{"method": "prune_heads", "ratio": 0.3, "heads_per_group": 1}])
    assert p.startswith("pipelines[0][0].ratio:") and "not both" in p
    assert spec.step_label({"method": "prune_heads", "heads_per_group": 2, "importance": "activation"}) == \
        "prune_heads-hpg2"


def test_llama_cpp_converts_and_runs_a_head_pruned_model(tiny_model_dir, tmp_path):
    """head_dim no longer equals hidden_size / num_attention_heads: the GGUF must carry it."""
    import torch

    from farm.export import FORMATS
    from farm.inputs.models import load_model
    from farm.runtimes import load

    out = tmp_path / "pruned"
    out.mkdir()
    run_method("prune_heads", tiny_model_dir, {**STEP, "heads_per_group": 1}, calib_tokens(), out, 1)
    exports = tmp_path / "exports"
    exports.mkdir()
    path = FORMATS.get("gguf").export(out, {"format": "gguf", "quant": "F32"}, exports, 1, None)
    ids = calib_tokens(32).tolist()
    got = load("llamacpp", path, threads=1, n_ctx=64).logits(ids)
    with torch.inference_mode():
        want = load_model(out)(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
