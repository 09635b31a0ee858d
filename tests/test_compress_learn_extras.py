"""QLoRA (an NF4 base under fp32 adapters, merged densely) and the distillation additions (sequence-level
KD from teacher continuations, MiniLM attention-map KL) on the tiny in-process model."""

import json

import numpy as np
import pytest

from farm.compress import run_method
from farm.measure.quality import tokenize_data

pytestmark = pytest.mark.slow
DATA = {"files": [], "calib_tokens": 2048, "eval_windows": 2, "eval_window_tokens": 64}
TRAIN = {"steps": 30, "batch": 2, "seq_len": 64, "temperature": 2.0, "kd_weight": 1.0, "seed": 0}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokens(tiny_model_dir):
    from farm.inputs.models import load_tokenizer

    return tokenize_data(load_tokenizer(tiny_model_dir), DATA)


def test_qlora_dense_merge_computes_what_the_adapted_nf4_model_computes(tiny_model_dir, tokens):
    import torch
    from peft import LoraConfig, get_peft_model

    from farm.compress.lora import dense_merge, load_nf4
    from farm.inputs.models import load_model

    calib, _ = tokens
    torch.manual_seed(0)
    peft_model = get_peft_model(load_nf4(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; give the adapters something to merge
            p.data.normal_(0, 0.05)
    merged = dense_merge(peft_model, tiny_model_dir)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    ids = torch.tensor([calib[:64].tolist()])
    with torch.no_grad():
        adapted, dense, fp32 = (m.eval()(ids).logits for m in (peft_model, merged, load_model(tiny_model_dir)))
    torch.testing.assert_close(dense, adapted, rtol=1e-4, atol=1e-4)
    assert float((dense - fp32).abs().max()) > 1e-2  # the delta (and NF4 rounding) are in there


def test_qlora_heals_a_pruned_model_into_a_dense_checkpoint(trained_tiny_dir, tokens, tmp_path):
    from safetensors import safe_open
    from test_compress_learn import kl_to, prune_then_heal

    calib, evals = tokens
    pruned, healed, info = prune_then_heal(trained_tiny_dir, calib, tmp_path, base_bits=4)
    assert info["base_bits"] == 4 and info["trainable_params"] > 0 and info["loss_last"] < info["loss_first"]
    assert info["merge_max_abs_logit_diff"] < 1e-3
    cfg = json.loads((healed / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == 3
    with safe_open(str(healed / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert not [k for k in keys if "lora" in k or "absmax" in k or "quant" in k]
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").shape == (64, 64)
    assert kl_to(trained_tiny_dir, healed, evals) < 0.8 * kl_to(trained_tiny_dir, pruned, evals)


def test_teacher_continuations_are_the_teachers_greedy_text(tiny_model_dir, tokens):
    import torch

    from farm.compress.kd import continuations, windows
    from farm.inputs.models import load_model

    calib, _ = tokens
    teacher = load_model(tiny_model_dir)
    seqs = continuations(teacher, calib, n=5, seq_len=32, batch=2)
    assert seqs.shape == (5, 32) and seqs.dtype == np.int64
    starts = [next(s for s in range(len(calib) - 16) if (calib[s:s + 16] == row[:16]).all()) for row in seqs]
    assert len(starts) == 5  # the prompts are calibration text
    with torch.inference_mode():
        logits = teacher(torch.tensor(seqs)).logits
    assert (logits[:, 15:31].argmax(-1).numpy() == seqs[:, 16:]).all()  # each token the teacher's argmax
    sampled = continuations(teacher, calib, n=5, seq_len=32, temperature=1.0)
    assert (sampled == continuations(teacher, calib, n=5, seq_len=32, temperature=1.0)).all()
    assert (sampled[:, :16] == seqs[:, :16]).all() and (sampled[:, 16:] != seqs[:, 16:]).any()
    # they join the calibration windows in proportion: 2048 // 32 = 64 windows of text, 64 generated
    rows = torch.cat(list(windows(calib, 32, 8, 50, extra=np.concatenate([seqs] * 13)[:64])))
    generated = sum(any((r.numpy() == s).all() for s in seqs) for r in rows)
    assert 0.35 < generated / len(rows) < 0.65


def test_attention_term_is_zero_for_the_teacher_itself_and_shrinks_with_training(tiny_model_dir, tokens, tmp_path):
    import torch

    from farm.compress.kd import attention_kl
    from farm.compress.prune_layers import drop_layers
    from farm.inputs.models import load_model

    calib, evals = tokens
    ids = torch.tensor(evals[:, 1:])  # the text of the windows, without their BOS (an attention sink for all heads)
    teacher = load_model(tiny_model_dir)  # random weights attend almost uniformly: sharpen q and k
    for layer in teacher.model.layers:
        layer.self_attn.q_proj.weight.data *= 10
        layer.self_attn.k_proj.weight.data *= 10
    sharp = tmp_path / "sharp"
    teacher.save_pretrained(sharp, safe_serialization=True)
    for f in tiny_model_dir.glob("tokenizer*"):
        (sharp / f.name).write_bytes(f.read_bytes())
    teacher.set_attn_implementation("eager")

    def maps(model):
        with torch.inference_mode():
            return model(ids, output_attentions=True).attentions

    ref = maps(teacher)
    assert float(attention_kl(ref, ref)) == 0.0
    student = load_model(sharp)
    drop_layers(student, [1, 2])
    student.set_attn_implementation("eager")
    before = float(attention_kl(maps(student), [ref[0], ref[3]]))
    assert before > 0

    after = {}
    for weight in (10.0, 0.0):  # with the term, and the same distillation without it
        out = tmp_path / f"student-{weight}"
        out.mkdir()
        step = {"method": "distill", "student_layers": 2, "lr": 2e-3, "teacher": True, "attention_weight": weight,
                **TRAIN}
        info = run_method("distill", sharp, step, calib, out, 1)
        assert json.loads((out / "config.json").read_text()).get("_attn_implementation") in (None, "sdpa")
        trained = load_model(out)
        trained.set_attn_implementation("eager")
        after[weight] = float(attention_kl(maps(trained), [ref[0], ref[3]]))
        if weight:
            assert info["attention_kl_last"] < info["attention_kl_first"]
    assert after[10.0] < 0.9 * before and after[10.0] < after[0.0], (before, after)


def test_distill_with_teacher_continuations_trains_on_them(tiny_model_dir, tokens, tmp_path):
    calib, _ = tokens
    step = {"method": "distill", "student_layers": 2, "lr": 2e-3, "teacher": True, "teacher_continuations": 8,
            **TRAIN, "steps": 4}
    info = run_method("distill", tiny_model_dir, step, calib, tmp_path, 1)
    assert info["teacher_continuations"] == 8 and info["continuation_tokens"] == 32 and info["steps"] == 4
