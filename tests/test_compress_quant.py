"""Post-training quantization in PyTorch (gptq, awq, smoothquant), each against its defining property,
on single layers and on the tiny in-process model."""

import json

import numpy as np
import pytest
from tiny_model import VOCAB

from farm.compress import run_method
from farm.errors import SpecError
from farm.sweep import spec


def calib_tokens(n: int = 1024) -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, size=n)


def outlier_layer(cols: int = 256, rows: int = 64, tokens: int = 2048):
    """A weight matrix and correlated inputs with a few large-magnitude channels, as LLM activations have."""
    import torch

    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g) * 0.05
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    x[:, :4] *= 20
    return w, x


def err(w, q, x) -> float:
    return float((x @ w.T - x @ q.T).norm())


@pytest.mark.parametrize("grid,group,act_order", [("q4_0", 32, False), ("q4_0", 32, True), ("sym", 64, False),
                                                  ("asym", 64, True)])
def test_gptq_reconstructs_a_layer_better_than_round_to_nearest(grid, group, act_order):
    from farm.compress.gptq import gptq, rtn

    w, x = outlier_layer()
    q = gptq(w, 2 * x.T @ x / len(x), grid, group, act_order=act_order)
    assert err(w, q, x) < 0.7 * err(w, rtn(w, grid, group), x)


def test_gptq_output_is_on_the_q4_0_grid_so_q4_0_requantization_is_exact():
    """llama.cpp's Q4_0 of GPTQ's weights finds the same scales and codes: nothing changes."""
    import torch

    from farm.compress.gptq import gptq, rtn

    w, x = outlier_layer()
    for act_order in (False, True):
        q = gptq(w, 2 * x.T @ x / len(x), "q4_0", 32, act_order=act_order)
        assert torch.equal(rtn(q, "q4_0", 32), q) and not torch.equal(rtn(w, "q4_0", 32), q)


def test_q4_0_grid_is_llama_cpp_q4_0():
    """The signed value of largest |x| maps to q = 0, its opposite clamps at 15, d is stored as fp16."""
    import torch

    from farm.compress.gptq import rtn

    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([-1.0, 1.0, 0.0625, 0.0624])  # d = -1 / -8; 0.0625 is half a step: rounds up
    q = rtn(x, "q4_0", 32)
    assert q[0, :4].tolist() == [-1.0, 0.875, 0.125, 0.0] and not q[0, 4:].any()


def test_gptq_on_the_tiny_model(tiny_model_dir, tmp_path):
    import torch

    from farm.compress.gptq import rtn
    from farm.inputs.models import load_model

    step = {"grid": "q4_0", "group_size": 32, "act_order": False, "percdamp": 0.01, "block_size": 128,
            "calib_samples": 4, "seq_len": 64}
    info = run_method("gptq", tiny_model_dir, step, calib_tokens(), tmp_path, 1)
    assert info["layers_quantized"] == 4 * 7 and info["rel_error_gptq"] < info["rel_error_rtn"]
    assert (tmp_path / "tokenizer.json").is_file()
    base, model = load_model(tiny_model_dir), load_model(tmp_path)
    w = model.model.layers[2].mlp.down_proj.weight.data
    assert torch.equal(rtn(w, "q4_0", 32), w) and not torch.equal(w, base.model.layers[2].mlp.down_proj.weight)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)  # left to the exporter


def test_awq_scales_protect_salient_channels():
    """On inputs with a few large channels, the searched scales give a lower quantized-output error than
    round-to-nearest (alpha = 0) on the same grid, and folding them keeps the float function."""
    import torch

    from farm.compress.awq import fold, search_scale
    from farm.compress.gptq import rtn

    w, x = outlier_layer()
    lin = torch.nn.Linear(256, 64, bias=False)
    lin.weight.data = w.clone()
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.ones(256))
    xs = list(x.reshape(4, -1, 256))
    s, losses = search_scale([lin], xs, lambda i, v: lin(v), "q4_0", 32, 20)
    assert min(losses) < 0.7 * losses[0] and torch.equal(lin.weight.data, w)  # weights restored after the search
    fold(norm, [lin], s)
    with torch.no_grad():
        torch.testing.assert_close(lin(x * norm.weight), x @ w.T, rtol=1e-4, atol=1e-4)
        assert err(w, rtn(lin.weight.data, "q4_0", 32) / s, x) < 0.7 * err(w, rtn(w, "q4_0", 32), x)


def with_outlier_channels(tiny_model_dir, out):
    """The tiny model with outlier channels entering q/k/v and gate/up, as real LLMs have."""
    from farm.inputs.models import load_model, save_with_tokenizer

    model = load_model(tiny_model_dir)
    for layer in model.model.layers:
        layer.input_layernorm.weight.data[:3] *= 30
        layer.post_attention_layernorm.weight.data[5:7] *= 30
    save_with_tokenizer(model, tiny_model_dir, out)
    return model, out


def test_awq_on_the_tiny_model_beats_rtn_and_keeps_the_function_until_rounded(tiny_model_dir, tmp_path):
    """With salient channels AWQ's searched scales must earn a clearly lower loss than alpha = 0 (plain
    round-to-nearest, in its grid, so a ratio <= 1 proves nothing); the random model without them: 0.90."""
    import torch

    from farm.compress.gptq import rtn
    from farm.inputs.models import load_model

    base, src = with_outlier_channels(tiny_model_dir, tmp_path / "outliers")
    step = {"grid": "q4_0", "group_size": 32, "n_grid": 5, "clip": False, "round": False, "calib_samples": 2,
            "seq_len": 64}
    info = run_method("awq", src, step, calib_tokens(), tmp_path / "scaled", 1)
    assert info["vo_skipped"] == 4  # GQA: 2 KV heads, 4 query heads
    assert info["loss_ratio_to_rtn"] < 0.7 and info["alpha_mean"] > 0, info  # measured: 0.40, alpha 0.375
    ids = torch.tensor([calib_tokens(32).tolist()])
    scaled = load_model(tmp_path / "scaled")
    with torch.inference_mode():
        torch.testing.assert_close(scaled(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-4)
    info = run_method("awq", src, {**step, "clip": True, "round": True}, calib_tokens(), tmp_path / "rounded", 1)
    w = load_model(tmp_path / "rounded").model.layers[0].mlp.gate_proj.weight.data
    assert info["rounded"] and torch.equal(rtn(w, "q4_0", 32), w)


def test_smoothquant_keeps_logits_and_flattens_activations(tiny_model_dir, tmp_path):
    import torch

    from farm.compress.smoothquant import input_max
    from farm.inputs.models import load_model

    model, src = with_outlier_channels(tiny_model_dir, tmp_path / "outliers")
    out = tmp_path / "smooth"
    step = {"alpha": 0.5, "down_proj": True, "calib_samples": 2, "seq_len": 64}
    info = run_method("smoothquant", src, step, calib_tokens(), out, 1)
    assert info["groups_smoothed"] == 4 * 3
    smooth = load_model(out)
    ids = torch.tensor([calib_tokens(48).tolist()])
    with torch.inference_mode():
        a, b = model(ids).logits, smooth(ids).logits
    assert float((a - b).abs().max() / a.abs().max()) < 1e-4

    def range_ratio(m) -> float:  # per-tensor max over mean per-channel max, q/k/v and gate/up inputs
        lins = [lin for layer in m.model.layers for lin in (layer.self_attn.q_proj, layer.mlp.gate_proj)]
        got = input_max(m, lins, [ids])
        return float(np.mean([float(v.max() / v.mean()) for v in got.values()]))

    assert range_ratio(smooth) < 0.5 * range_ratio(model)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


@pytest.mark.parametrize("step,field", [
    ({"method": "gptq", "grid": "sym", "group_size": 48}, "group_size"),
    ({"method": "gptq", "group_size": 64}, "group_size"),  # q4_0 is 32 by definition
    ({"method": "awq", "grid": "int3"}, "grid"),
    ({"method": "smoothquant", "alpha": 1.5}, "alpha"),
    ({"method": "smoothquant", "alpha": [0.5, -0.1]}, "alpha"),
    ({"method": "gptq", "percdamp": 0}, "percdamp"),
])
def test_quant_steps_reject_bad_parameters_naming_the_field(step, field):
    data = {"name": "q", "pipelines": [[step]], "exports": [{"format": "gguf", "quant": "Q4_0"}]}
    with pytest.raises(SpecError) as e:
        spec.parse(data)
    assert any(p.startswith(f"pipelines[0][0].{field}:") for p in e.value.problems), e.value.problems


def test_quant_steps_fill_their_defaults():
    sweep = spec.parse({"name": "q", "pipelines": [[{"method": "gptq"}], [{"method": "awq"}],
                                                   [{"method": "smoothquant", "alpha": [0.5, 0.8]}]],
                        "exports": [{"format": "gguf", "quant": "Q4_0"}]})
    gptq, awq, sq = (p[0].model_dump() for p in sweep.pipelines)
    assert (gptq["grid"], gptq["group_size"], gptq["percdamp"]) == ("q4_0", 32, 0.01)
    assert (awq["n_grid"], awq["clip"], awq["round"]) == (20, True, False)
    assert spec.step_label({**sq, "alpha": 0.8}) == "smoothquant-a0.8" and spec.grid_fields("smoothquant") == ("alpha",)


def test_int4_group_must_divide_the_model_widths():
    data = {"name": "q", "pipelines": [[{"method": "awq", "grid": "sym", "group_size": 128}]],
            "exports": [{"format": "gguf", "quant": "Q4_0"}]}
    [p] = pytest.raises(SpecError, spec.parse, data).value.problems
    assert p.startswith("pipelines[0][0].group_size: 128 does not divide") and "hidden_size 576" in p


def test_autoround_on_the_tiny_model_lands_on_the_q4_0_grid(trained_tiny_dir, tmp_path):
    """AutoRound (Intel's auto-round, run offline on farm's calibration windows) next to farm's GPTQ: its weights
    are on llama.cpp's Q4_0 grid, so the GGUF Q4_0 export keeps them; its tuned rounding is not plain RTN."""
    import torch

    from farm.compress.gptq import rtn
    from farm.inputs.models import load_model

    step = {"iters": 10, "calib_samples": 4, "seq_len": 64, "batch_size": 4}
    out = tmp_path / "stage" / "model"
    out.mkdir(parents=True)
    info = run_method("autoround", trained_tiny_dir, step, calib_tokens(), out, 1)
    assert info["layers_quantized"] == 4 * 7 and info["groups"] > 0 and 0 <= info["groups_snapped"] <= info["groups"]
    base, model = load_model(trained_tiny_dir), load_model(out)
    moved = 0
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        w = model.model.layers[1].get_submodule(name).weight.data
        w0 = base.model.layers[1].get_submodule(name).weight.data
        assert torch.equal(rtn(w, "q4_0", 32), w)  # on the grid
        moved += int((w != rtn(w0, "q4_0", 32)).sum())
    assert moved > 0  # AutoRound's tuned rounding, not round-to-nearest
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)  # left to the exporter
