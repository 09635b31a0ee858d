"""Supervised fine-tuning (farm/compress/sft.py, farm/instructions.py): chats from JSONL files or a task's train
half, rendered with the chat template, the loss on the answers only; the held-out half the sweep scores;
the training curve as MLflow histories."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from farm.errors import SpecError
from farm.inputs import instructions
from farm.measure import tasks
from farm.plan import grid as gridmod
from farm.record.cells import step_metrics
from farm.sweep import spec

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a ChatML chat template (its tokenizer ships none)."""
    return with_chat_template(tiny_model_dir, tmp_path_factory.mktemp("tiny-chat") / "model")


def chats_file(path, n=160):
    """Arithmetic-free, learnable chats: the answer repeats a word of the question in capitals."""
    words = ["apple", "river", "stone", "cloud", "table", "green", "night", "music"]
    with open(path, "w") as f:
        for i in range(n):
            w = words[i % len(words)]
            f.write(json.dumps({"instruction": f"Shout the word {w}.", "response": w.upper() + "!"}) + "\n")
    return path


def test_jsonl_rows_become_chats_and_bad_lines_are_named(tmp_path):
    assert instructions.chat({"instruction": "a", "input": "b", "response": "c"}) == [
        {"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "x"}]
    assert instructions.chat({"messages": msgs}) == msgs
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "a", "response": "b"}\nnot json\n{"messages": [{"role": "user", "content": "u"}]}\n')
    problems = instructions.file_problems(f)
    assert len(problems) == 2 and "line 2" in problems[0] and "line 3" in problems[1] and "end with" in problems[1]
    assert "does not exist" in instructions.file_problems(tmp_path / "none.jsonl")[0]


def test_a_sft_step_is_validated_before_anything_runs(chat_model_dir, tmp_path):
    base = f"name: t\nbase: {{model: {chat_model_dir}}}\nexports: [{{format: gguf, quant: F16}}]\n"
    bad = {"pipelines: [[{method: sft}]]": "give the instruction data",
           "pipelines: [[{method: sft, task: winogrande}]]": "varies the context",
           "pipelines: [[{method: sft, task: piqq}]]": "is not one of",
           f"pipelines: [[{{method: sft, files: [{tmp_path / 'none.jsonl'}]}}]]": r"files\[0\]: file .* does not exist",
           "pipelines: [[{method: sft, task: piqa, base_bits: 8}]]": "NF4"}
    for text, want in bad.items():
        with pytest.raises(SpecError, match=want):
            spec.loads(base + text)


def test_the_loss_is_on_the_answer_only(chat_model_dir):
    from farm.inputs.models import load_tokenizer

    tok = load_tokenizer(chat_model_dir)
    chat = [{"role": "user", "content": "Shout the word apple."}, {"role": "assistant", "content": "APPLE!"}]
    ids, labels = instructions.encode(tok, chat, 512)
    answer = [t for t in labels if t != instructions.IGNORE]
    assert len(ids) == len(labels) and 0 < len(answer) < len(ids)
    assert labels[:len(ids) - len(answer)] == [instructions.IGNORE] * (len(ids) - len(answer))  # prompt masked
    assert tok.decode(answer).startswith("APPLE!")  # the answer (and the template's end of turn after it)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        instructions.encode(tok, chat, 512)


def test_task_halves_are_disjoint_and_a_task_trains_on_its_train_half_only():
    for task in ("piqa", "arc_easy"):
        train, held = tasks.halves(task)
        n = tasks.split_size(task)
        assert not set(train) & set(held) and sorted(train + held) == list(range(n))
        assert set(tasks.sample(task, 40, 0, held_out=True)) <= set(held)
        assert tasks.halves(task) == (train, held)  # fixed: every sweep splits the same way
    chats = instructions.from_task("arc_easy")
    assert len(chats) == len(tasks.halves("arc_easy")[0])
    user, answer = chats[0]
    assert user["content"].startswith("Question: ") and user["content"].endswith("Answer:") and answer["content"]
    # the prompts of the held-out half never appear among the training chats
    from lm_eval.api.task import ConfigurableTask

    [cfg] = tasks.task_configs(["arc_easy"])
    docs = ConfigurableTask(config=cfg).validation_docs()
    held = {str(ConfigurableTask(config=cfg).doc_to_text(docs[i])) for i in tasks.halves("arc_easy")[1][:50]}
    assert not held & {c[0]["content"] for c in chats}


def test_a_sweep_that_trains_on_a_task_scores_it_on_the_held_out_half(chat_model_dir):
    text = (f"name: t\nbase: {{model: {chat_model_dir}}}\nexports: [{{format: gguf, quant: F16}}]\n"
            "pipelines: [[], [{method: sft, task: piqa}]]\ntasks: {items: {piqa: 20, arc_easy: 10}}\n")
    g = gridmod.build(spec.loads(text))
    scored = [s.params["tasks"]["held_out"] for s in g.stages.values() if s.kind == "tasks"]
    assert len(scored) >= 2 and all(h == ["piqa"] for h in scored)  # the base too: the same held-out items
    without = gridmod.build(spec.loads(text.replace("pipelines: [[], [{method: sft, task: piqa}]]\n", "")))
    assert all("held_out" not in s.params["tasks"] for s in without.stages.values() if s.kind == "tasks")


def test_changing_the_text_of_a_sweeps_files_changes_the_stages_that_read_them(chat_model_dir, tmp_path):
    chats, corpus = chats_file(tmp_path / "chats.jsonl"), tmp_path / "corpus.txt"
    corpus.write_text("one paragraph of text.\n\nanother paragraph.\n")
    text = (f"name: t\nbase: {{model: {chat_model_dir}}}\nexports: [{{format: gguf, quant: F16}}]\n"
            f"data: {{files: [{corpus}]}}\npipelines: [[], [{{method: sft, files: [{chats}]}}]]\n")

    def ids():
        return {(s.kind, s.params.get("step", {}).get("method")): sid for sid, s in gridmod.build(spec.loads(text)).stages.items()}

    before = ids()
    with open(chats, "a") as f:  # the same path, one more chat
        f.write(json.dumps({"instruction": "Shout the word sun.", "response": "SUN!"}) + "\n")
    after_chats = ids()
    assert after_chats[("compress", "sft")] != before[("compress", "sft")]
    assert after_chats[("reference", None)] == before[("reference", None)]  # the calibration text did not change
    corpus.write_text("other text.\n\nand more.\n")
    after_corpus = ids()
    assert after_corpus[("reference", None)] != after_chats[("reference", None)]
    assert after_corpus[("base", None)] == before[("base", None)]


@pytest.mark.slow
@pytest.mark.parametrize("base_bits", [None, 4])
def test_sft_learns_the_answers_and_merges(trained_tiny_dir, tmp_path, base_bits):
    import torch

    from farm.compress import run_method
    from farm.compress.sft import answer_loss, padded
    from farm.inputs.models import load_model, load_tokenizer

    base = with_chat_template(trained_tiny_dir, tmp_path / "base")  # a model that has learnt some text
    step = {"method": "sft", "files": [str(chats_file(tmp_path / "chats.jsonl"))], "val_examples": 16, "rank": 8,
            "lr": 1e-2, "epochs": 3, "batch": 8, "eval_every": 10, "base_bits": base_bits,
            "curate": {"dedupe": False}}  # the file repeats its 8 chats on purpose
    out = tmp_path / "stage" / "model"
    out.mkdir(parents=True)
    info = run_method("sft", base, step, np.zeros(1, dtype=np.int64), out, 1)
    assert info["examples"] == 144 and info["val_examples"] == 16 and info["steps"] == 54
    assert info["curate.read"] == info["curate.kept"] == 160 and info["curate.exact_dups"] == 0  # curation's counts
    curve = info["curve"]
    assert len(curve["train_loss"]) == 54 and [s for s, _ in curve["val_loss"]] == [0, 10, 20, 30, 40, 50, 54]
    # the held-out chats' answers became far more likely
    assert curve["val_loss"][-1][1] < 0.7 * curve["val_loss"][0][1], curve["val_loss"]
    assert info["val_loss_last"] == round(curve["val_loss"][-1][1], 5) and info["merge_max_abs_logit_diff"] < 1e-2
    assert (tmp_path / "stage" / "adapter" / "adapter_config.json").is_file()
    # the merged dense checkpoint is the tuned model: on a chat it never saw, its answer loss is the tuned one
    tok = load_tokenizer(out)
    chat = [{"role": "user", "content": "Shout the word stone!"}, {"role": "assistant", "content": "STONE!"}]
    batch = padded([instructions.encode(tok, chat, 512)], tok.pad_token_id)
    with torch.no_grad():
        tuned, before = (float(answer_loss(load_model(d), *batch)) for d in (out, base))
    assert tuned < before - 1.0, (tuned, before)


@pytest.mark.slow
def test_keep_best_returns_to_the_lowest_validation_loss(trained_tiny_dir, tmp_path):
    """With keep: best the merged model is the adapters at the lowest validation loss, not the last step's. The
    file is laid out so that the step's seeded split (random.Random(0) shuffles the chats; the first
    val_examples are held out) holds out chats answering in capitals while the training chats answer in
    lower case: training makes the held-out loss rise, and the saved model must have the lowest one."""
    import random

    from farm.compress import run_method
    from farm.compress.sft import val_loss
    from farm.inputs.models import load_model, load_tokenizer

    base = with_chat_template(trained_tiny_dir, tmp_path / "base")
    n, n_val, words = 48, 16, ["apple", "river", "stone", "cloud", "table", "green", "night", "music"]
    order = list(range(n))
    random.Random(0).shuffle(order)  # the permutation the step's shuffle applies to n chats
    held_out = set(order[:n_val])
    rows = [{"instruction": f"Shout the word {words[i % 8]}.",
             "response": words[i % 8].upper() + "!" if i in held_out else words[i % 8] + "..."} for i in range(n)]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    step = {"method": "sft", "files": [str(chats)], "val_examples": n_val, "rank": 8, "lr": 1e-2, "epochs": 30,
            "batch": 8, "eval_every": 10, "keep": "best", "curate": {"dedupe": False}}  # repeats on purpose
    out = tmp_path / "stage" / "model"
    out.mkdir(parents=True)
    info = run_method("sft", base, step, np.zeros(1, dtype=np.int64), out, 1)
    curve = info["curve"]["val_loss"]
    best_step, best_val = min(curve, key=lambda sv: sv[1])
    assert info["kept_step"] == best_step and info["val_loss_kept"] == round(best_val, 5)
    assert best_step < info["steps"] and best_val < curve[-1][1] - 0.01, curve  # the held-out loss did rise
    val_chats = instructions.from_files([str(chats)])
    random.Random(0).shuffle(val_chats)
    assert all(c[-1]["content"].endswith("!") for c in val_chats[:n_val])  # the layout held out what it meant to
    tok = load_tokenizer(out)
    encoded = [instructions.encode(tok, c, 256) for c in val_chats[:n_val]]
    assert val_loss(load_model(out), encoded, tok.pad_token_id, 8) == pytest.approx(best_val, abs=2e-3)


def with_chat_template(model_dir, out):
    shutil.copytree(model_dir, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHATML}))
    return out


def test_training_curves_become_mlflow_histories():
    steps = [None, {"params": {"step": {"method": "sft"}},
                    "info": {"steps": 3, "loss_last": 0.5, "objective": "sft", "merged": True,
                             "curve": {"train_loss": [2.0, 1.0, 0.5], "val_loss": [[0, 2.5], [3, 0.7]]}}},
             {"params": {"step": {"method": "sft"}}, "info": {"steps": 1}}]
    scalars, history = step_metrics(steps)
    assert scalars == {"sft.steps": 3.0, "sft.loss_last": 0.5, "sft_2.steps": 1.0}
    assert history == {"sft.train_loss": [[1, 2.0], [2, 1.0], [3, 0.5]], "sft.val_loss": [[0, 2.5], [3, 0.7]]}


@pytest.mark.slow
def test_the_adapter_as_gguf_is_served_by_llama_server_like_the_merged_model(trained_tiny_dir, tmp_path):
    """The sft step's adapter, converted by llama.cpp's convert_lora_to_gguf.py, on the base model's GGUF in
    llama-cpp-python and in llama-server (`farm serve --lora`): the same next tokens as the merged model's GGUF."""
    from llama_cpp import Llama

    from farm.compress import run_method
    from farm.export.gguf_export import convert
    from farm.inputs.models import load_tokenizer
    from farm.runtimes import ggml_cpu
    from farm.serve.llamacpp_server import server

    base = with_chat_template(trained_tiny_dir, tmp_path / "base")
    step = {"method": "sft", "files": [str(chats_file(tmp_path / "chats.jsonl"))], "val_examples": 16, "rank": 8,
            "lr": 1e-2, "epochs": 3, "batch": 8, "curate": {"dedupe": False}}
    out = tmp_path / "stage" / "model"
    out.mkdir(parents=True)
    info = run_method("sft", base, step, np.zeros(1, dtype=np.int64), out, 1)
    adapter = tmp_path / "stage" / info["adapter_gguf"]
    assert info["adapter_gguf"] == "adapter/adapter-f16.gguf" and adapter.is_file()
    convert(base, tmp_path / "base.gguf", "F16")
    convert(out, tmp_path / "merged.gguf", "F16")
    tok = load_tokenizer(base)
    chat = [{"role": "user", "content": "Shout the word cloud!"}]
    ids = list(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True))

    ggml_cpu.select(False)  # llama.cpp's CPU backend for this CPU, as farm's runtime loads it

    def logits(path, **kw):
        llm = Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1, **kw)
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])

    merged, with_adapter, plain = logits(tmp_path / "merged.gguf"), logits(tmp_path / "base.gguf",
                                                                          lora_path=str(adapter)), logits(tmp_path / "base.gguf")
    assert (merged.argmax(-1) == with_adapter.argmax(-1)).all()
    assert np.abs(merged - with_adapter).max() < 0.1 * np.abs(merged - plain).max()  # the adapter is what differs
    # llama-server: one base, the adapter off by default, on for the request that asks for it; the first answer
    # token's distribution (top 5 with log-probabilities) is the merged model's
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    body = {"prompt": prompt, "n_predict": 1, "n_probs": 5, "temperature": 0.0}

    def top(url, **extra):
        [first] = post_json(f"{url}/completion", {**body, **extra})["completion_probabilities"]
        return [(t["id"], t["logprob"]) for t in first["top_logprobs"]]

    with server(tmp_path / "merged.gguf", tmp_path / "engine-merged", 1, 2, 512) as srv:
        merged_top = top(srv.url)
    with server(tmp_path / "base.gguf", tmp_path / "engine-base", 1, 2, 512, lora=[adapter], lora_applied=False) as srv:
        off, on = top(srv.url), top(srv.url, lora=[{"id": 0, "scale": 1.0}])
    assert [i for i, _ in on] == [i for i, _ in merged_top]
    assert max(abs(a - b) for (_, a), (_, b) in zip(on, merged_top)) < 0.05, (on, merged_top)
    assert max(abs(a - b) for (_, a), (_, b) in zip(off, merged_top)) > 0.2, (off, merged_top)  # off: the base


def post_json(url: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())
