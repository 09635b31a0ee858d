"""Movement pruning (farm/compress/movement_pruning.py) on the tiny in-process model, each test against a
defining property: the scores learn the weights' movement (dL/dW' * W), the masked share follows the cubic
schedule, what movement removes is what hurts the loss (not what is small), and the smaller dense model
it saves computes what the masked model computed."""

import json

import pytest

from farm.compress import movement_pruning as mp
from farm.compress import run_method
from farm.errors import SpecError
from farm.measure.quality import tokenize_data
from farm.sweep import spec


DATA = {"files": [], "calib_tokens": 2048, "eval_windows": 2, "eval_window_tokens": 64}


@pytest.fixture(scope="module")
def tokens(tiny_model_dir):
    from farm.inputs.models import load_tokenizer

    return tokenize_data(load_tokenizer(tiny_model_dir), DATA)[0]


def options(**kw) -> mp.Options:
    return mp.Options.model_validate({"method": "movement_pruning", "steps": 6, "batch": 2, "seq_len": 32, **kw})


def test_the_masked_share_rises_cubically_to_the_target_and_stays():
    shares = [mp.schedule(i, 30, 0.5, 0.67) for i in range(30)]
    assert shares[0] == 0 and shares[20:] == [0.5] * 10
    assert all(a < b for a, b in zip(shares[:21], shares[1:21]))
    assert shares[10] == pytest.approx(0.5 * (1 - (1 - 10 / 20) ** 3))  # cubic: fast early, slow late


def test_a_score_gradient_is_the_movement_of_its_weight():
    """dL/dS = dL/dW' * W (the paper's first-order score), computed by the straight-through mask."""
    import torch
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6, bias=False)
    w = lin.weight.detach().clone()
    scores = torch.randn(6, 8)
    parametrize.register_parametrization(lin, "weight", mp.mask_module(scores.clone(), mp.keep_top, lambda m: m),
                                         unsafe=True)
    masked = lin.parametrizations.weight[0]
    masked.share = 0.25
    x = torch.randn(5, 8)
    (lin(x) ** 2).sum().backward()
    keep = mp.keep_top(scores, 0.25)
    assert int(keep.sum()) == 36  # 48 weights, a quarter masked
    ref = (w * keep).requires_grad_(True)
    ((x @ ref.T) ** 2).sum().backward()
    torch.testing.assert_close(masked.scores.grad, ref.grad * w)


@pytest.mark.slow
def test_movement_removes_the_channels_that_hurt_the_loss_not_the_small_ones(trained_tiny_dir, tokens):
    """Half of every block's MLP channels get large random output weights (noise that raises the loss):
    by magnitude they would be the last to go; movement pruning on the text's loss removes most of them
    (in 24 steps: ~86 % in the first block, ~60 % in the later ones, where the first-order signal is weaker)."""
    import torch

    from farm.compress.common import load

    model = load(trained_tiny_dir, 1)
    gen = torch.Generator().manual_seed(0)
    noisy = []
    for layer in model.model.layers:
        down = layer.mlp.down_proj.weight.data
        idx = torch.randperm(down.shape[1], generator=gen)[: down.shape[1] // 2]
        down[:, idx] = torch.randn(down.shape[0], len(idx), generator=gen) * down.abs().max() * 2
        noisy.append(set(idx.tolist()))
    opt = options(target="mlp", sparsity=0.5, teacher=False, kd_weight=0.0, steps=24, ramp=0.5, lr=1e-6)
    places, info = mp.train(model, None, tokens, opt)
    removed = [set(torch.nonzero(~keep(m.scores.detach(), m.share)).flatten().tolist())
               for m, (_, _, keep, _) in zip((lin.parametrizations.weight[0] for lin, *_ in places), places)]
    caught = sum(len(r & n) for r, n in zip(removed, noisy)) / sum(len(n) for n in noisy)
    # chance is 50 % (± 1.6 % over 1024 channels); magnitude, keeping the largest columns, removes ~none
    by_size = [set(torch.topk(lin.parametrizations.weight.original.norm(dim=0), len(n), largest=False).indices.tolist())
               for (lin, *_), n in zip(places, noisy)]
    assert sum(len(r & n) for r, n in zip(by_size, noisy)) / sum(len(n) for n in noisy) < 0.05
    assert caught > 0.6, f"movement removed only {caught:.0%} of the noise channels"
    assert info["loss_last"] < info["loss_first"]


@pytest.mark.slow
@pytest.mark.parametrize("target,sparsity,field,after", [("mlp", 0.5, "intermediate_size", 256),
                                                          ("heads", 0.5, "num_attention_heads", 2)])
def test_the_saved_smaller_model_computes_what_the_masked_model_computed(trained_tiny_dir, tokens, tmp_path,
                                                                         target, sparsity, field, after):
    import torch

    from farm.compress.common import load
    from farm.inputs.models import load_model

    model = load(trained_tiny_dir, 1)
    teacher = load(trained_tiny_dir, 1).eval()
    opt = options(target=target, sparsity=sparsity)
    places, _ = mp.train(model, teacher, tokens, opt)
    ids = torch.tensor([tokens[:48].tolist()])
    with torch.inference_mode():
        masked = model(ids).logits
    info = mp.finalize(model, places, opt)
    assert getattr(model.config, field) == after
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, masked, rtol=1e-4, atol=1e-4)
    out = tmp_path / target
    out.mkdir()
    info = run_method("movement_pruning", trained_tiny_dir, {"target": target, "sparsity": sparsity, "steps": 3,
                                                             "batch": 2, "seq_len": 32}, tokens, out, 1)
    assert json.loads((out / "config.json").read_text())[field] == after
    assert info["params_after"] < sum(p.numel() for p in teacher.parameters())
    load_model(out)  # loads as an ordinary dense checkpoint


@pytest.mark.slow
def test_weights_target_reaches_its_sparsity_and_stays_dense(trained_tiny_dir, tokens, tmp_path):
    info = run_method("movement_pruning", trained_tiny_dir, {"target": "weights", "sparsity": 0.6, "steps": 3,
                                                             "batch": 2, "seq_len": 32}, tokens, tmp_path, 1)
    assert info["sparsity_achieved"] == pytest.approx(0.6, abs=0.01)


def test_a_sparsity_or_model_it_cannot_take_is_refused_before_work(tiny_model_dir, tmp_path):
    base = f"name: t\nbase: {{model: {tiny_model_dir}}}\nexports: [{{format: gguf, quant: F16}}]\n"
    bad = {"[[{method: movement_pruning, target: heads, sparsity: 0.1}]]": "must remove some but not all",
           "[[{method: movement_pruning, target: mlp, sparsity: 0.01}]]": "keeps all 512 MLP channels",
           "[[{method: movement_pruning, target: rows, sparsity: 0.5}]]": "target"}
    for text, want in bad.items():
        with pytest.raises(SpecError, match=want):
            spec.loads(base + f"pipelines: {text}\n")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(SpecError, match="supports the architectures llama"):
        spec.loads(base.replace(str(tiny_model_dir), str(gpt2)) +
                   "pipelines: [[{method: movement_pruning, target: weights, sparsity: 0.5}]]\n")
