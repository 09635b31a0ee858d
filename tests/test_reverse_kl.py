"""On-policy reverse-KL distillation (distill's `divergence: reverse`, farm/compress/reverse_kl.py): the loss
against torch's own KL of categoricals, the student's seeded rollouts, the sweep-load refusals, and a short run
on the tiny model that brings the student closer to the teacher where the student itself samples."""

from pathlib import Path

import pytest
import yaml

from farm.compress import run_method
from farm.errors import SpecError
from farm.measure.quality import tokenize_data
from farm.sweep import spec

DATA = {"files": [], "calib_tokens": 2048, "eval_windows": 4, "eval_window_tokens": 64}
TRAIN = {"steps": 12, "batch": 2, "seq_len": 64, "kd_weight": 1.0, "seed": 0}


@pytest.fixture(scope="module")
def tokens(tiny_model_dir):
    from farm.inputs.models import load_tokenizer

    return tokenize_data(load_tokenizer(tiny_model_dir), DATA)


def test_reverse_kl_is_torchs_kl_of_categoricals_and_trains_the_student_only():
    import torch
    from torch.distributions import Categorical, kl_divergence

    from farm.compress.reverse_kl import reverse_kl

    torch.manual_seed(0)
    student = (3 * torch.randn(2, 5, 50)).requires_grad_()
    teacher = (3 * torch.randn(2, 5, 50)).requires_grad_()
    loss = reverse_kl(student, teacher)
    ref = kl_divergence(Categorical(logits=student), Categorical(logits=teacher)).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    forward = kl_divergence(Categorical(logits=teacher), Categorical(logits=student)).mean()
    assert abs(loss.item() - forward.item()) > 0.1  # the direction matters on these logits
    assert reverse_kl(student, student.detach().clone()).item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None and float(student.grad.abs().sum()) > 0


def test_rollouts_keep_the_prompt_and_are_the_students_seeded_samples(tiny_model_dir, tokens):
    import torch

    from farm.compress.reverse_kl import rollouts
    from farm.inputs.models import load_model

    calib, _ = tokens
    model = load_model(tiny_model_dir).train()
    prompts = torch.tensor(calib[:64].reshape(4, 16))
    greedy = rollouts(model, prompts, 8, 0.0, torch.Generator().manual_seed(0))
    assert greedy.shape == (4, 24) and (greedy[:, :16] == prompts).all() and model.training
    with torch.no_grad():
        logits = model.eval()(greedy).logits
    assert (logits[:, 15:23].argmax(-1) == greedy[:, 16:]).all()  # each new token the student's own argmax
    sampled = [rollouts(model, prompts, 8, 1.0, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert (sampled[0] == sampled[1]).all() and (sampled[0] != sampled[2]).any() and not sampled[0].requires_grad


def test_the_teacher_grades_the_students_own_continuations(tiny_model_dir, tokens):
    """On-policy: the windows the teacher scores are the calibration prompts continued by the student (its
    seeded samples), not the calibration text; the loss is the reverse KL on the positions that sampled."""
    import torch

    from farm.compress.common import drop_layers
    from farm.compress.reverse_kl import OnPolicy, reverse_kl, rollouts
    from farm.inputs.models import load_model

    calib, _ = tokens
    teacher, student = load_model(tiny_model_dir).eval(), load_model(tiny_model_dir).train()
    drop_layers(student, [1, 2])
    seen = []

    def grade(ids, **kw):
        seen.append(ids.clone())
        return teacher(ids, **kw)

    ids = torch.tensor(calib[:128].reshape(2, 64))
    loss = OnPolicy(grade, 64, 1.0, 1.0, seed=5).loss(student, ids)
    expected = rollouts(student, ids[:, :32], 32, 1.0, torch.Generator().manual_seed(5))
    [graded] = seen
    assert (graded == expected).all() and (graded[:, 32:] != ids[:, 32:]).any()
    with torch.no_grad():
        ref = reverse_kl(student(expected).logits[:, 31:-1], teacher(expected).logits[:, 31:-1])
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-4, atol=1e-6)
    assert loss.requires_grad


def distill_step(**extra) -> dict:
    return {"method": "distill", "student_layers": 2, **extra}


def refusal(step: dict) -> str:
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml").read_text())
    data["pipelines"] = [[step]]
    with pytest.raises(SpecError) as e:
        spec.parse(data)
    [problem] = e.value.problems
    return problem


@pytest.mark.parametrize("extra,field,hint", [
    ({"divergence": "reverse", "teacher": False}, "divergence", "teacher: true"),
    ({"divergence": "reverse", "attention_weight": 1.0}, "attention_weight", "divergence: forward"),
    ({"divergence": "reverse", "hidden_weight": 1.0}, "hidden_weight", "divergence: forward"),
    ({"divergence": "reverse", "teacher_continuations": 8}, "teacher_continuations", "divergence: forward"),
    ({"divergence": "reverse", "temperature": 1.0}, "temperature", "rollout_temperature"),
    ({"rollout_temperature": 0.7}, "rollout_temperature", "divergence: reverse"),
    ({"divergence": "backward"}, "divergence", "reverse"),
])
def test_a_sweep_refuses_what_reverse_kl_does_not_combine_with(extra, field, hint):
    problem = refusal(distill_step(**extra))
    assert problem.startswith("pipelines[0][0]") and f"{field}:" in problem and hint in problem, problem


def test_reverse_cells_are_labelled_apart_and_forward_labels_are_unchanged():
    from farm.compress.distill import Options

    forward = Options(**distill_step()).model_dump()
    assert Options.label_of(forward) == "L2"
    reverse = Options(**distill_step(divergence="reverse", rollout_temperature=0.5)).model_dump()
    assert Options.label_of(reverse) == "L2-reverse-rt0.5"


def kl_on_own_samples(student, teacher, evals) -> float:
    """Mean KL(student || teacher) over the positions where the student continues the evaluation windows'
    first halves, sampling at temperature 1 (the same seed for every student)."""
    import torch

    from farm.compress.reverse_kl import reverse_kl, rollouts

    prompts = torch.tensor(evals[:, :32])
    ids = rollouts(student, prompts, 32, 1.0, torch.Generator().manual_seed(123))
    with torch.no_grad():
        return float(reverse_kl(student(ids).logits[:, 31:-1], teacher(ids).logits[:, 31:-1]))


@pytest.mark.slow
def test_reverse_kl_distillation_brings_the_student_closer_where_it_samples(trained_tiny_dir, tokens, tmp_path):
    from farm.compress.common import drop_layers
    from farm.inputs.models import load_model

    calib, evals = tokens
    teacher = load_model(trained_tiny_dir).eval()
    untrained = load_model(trained_tiny_dir).eval()
    drop_layers(untrained, [1, 2])  # the student distill starts from: blocks 0 and 3
    before = kl_on_own_samples(untrained, teacher, evals)

    step = distill_step(lr=2e-3, divergence="reverse", **TRAIN)
    info = run_method("distill", trained_tiny_dir, step, calib, tmp_path, 1)
    assert info["objective"] == "reverse_kl" and info["steps"] == 12 and info["kept_layers"] == [0, 3]
    assert info["rollout_tokens_per_step"] == 2 * 32
    assert info["sampling_seconds"] >= 0 and info["update_seconds"] >= 0
    assert info["loss_last"] < info["loss_first"], info
    after = kl_on_own_samples(load_model(tmp_path).eval(), teacher, evals)
    assert after < 0.7 * before, (before, after)
