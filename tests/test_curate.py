"""Curation of sft data (farm/inputs/curate.py): duplicates and near duplicates, length and format filters, and
decontamination against the items the sweep scores — counted, refused above the threshold at the sweep's
validation and in the stage, and part of the sft stage's identity."""

from __future__ import annotations

import contextlib
import io
import json
import random

import numpy as np
import pytest

from farm.errors import SpecError
from farm.inputs import curate as cu
from farm.inputs import taskdata
from farm.plan import grid as gridmod
from farm.sweep import spec


def chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def clean_chats(n: int) -> list[list[dict]]:
    """Distinct chats, no two alike, touching no task's items."""
    return [chat(f"Add {i} and {i + 7}, then name the colour number {i}.", f"{2 * i + 7}, and colour {i}.")
            for i in range(n)]


def write_jsonl(path, chats: list[list[dict]]):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path


def test_the_normalisation_and_ngrams_are_lm_evals_janitors():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from lm_eval.decontamination.janitor import Janitor, word_ngrams  # prints a warning: no C++ helper
    text = "  I'm a Very !dirty,, ,,  DIRTY boy.\n\tClean me — naïve café 3.5% (ok)?  " * 2
    jan = Janitor(ngram_n=5)
    assert cu.words(text) == jan.normalize_string(text).split()
    assert cu.ngrams(cu.words(text), 5) == set(word_ngrams(jan.normalize_string(text), 5))


def test_exact_and_near_duplicates_are_dropped_and_counted():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(400)]
    base = [" ".join(rng.choice(vocab) for _ in range(60)) for _ in range(30)]
    chats = [chat("Summarise.", t) for t in base]  # 30 distinct texts
    chats += [chat("SUMMARISE!", base[0].upper()), chat("summarise", base[1] + " .")]  # 2 exact after normalising
    near = []
    for t in base[2:8]:  # 6 near duplicates: one word of 60 changed (Jaccard of 3-gram shingles about 0.9)
        ws = t.split()
        ws[30] = "changed"
        near.append(chat("Summarise.", " ".join(ws)))
    far = [chat("Summarise.", " ".join(t.split()[:30] + [rng.choice(vocab) for _ in range(30)])) for t in base[8:12]]
    kept, counts = cu.curate([], chats + near + far, cu.Curate())
    assert counts["exact_dups"] == 2 and counts["near_dups"] == 6 and counts["kept"] == 34 == len(kept)
    assert kept == chats[:30] + far  # the first of each group stays, in order
    # LSH only proposes: the decision is the exact Jaccard of the shingles, as a brute-force pass gives it
    sh = [cu.shingles(cu.dedupe_text(c)) for c in chats[:30] + near + far]
    brute = [i for i in range(len(sh)) if any(cu.jaccard(sh[i], sh[j]) >= 0.8 for j in range(i))]
    assert brute == list(range(30, 36)) and all(cu.jaccard(sh[i], sh[j]) < 0.6 for i in range(36, 40) for j in range(i))
    assert cu.curate([], chats + near, cu.Curate(near_dup=None))[1]["near_dups"] == 0
    assert cu.curate([], chats + near, cu.Curate(dedupe=False))[1]["kept"] == 38


def test_length_and_format_filters():
    good = clean_chats(5)
    bad_format = [chat("Name a colour.", "   "), chat("Repeat: hello world", "repeat hello, WORLD!"),
                  chat("Say hi.", "\x00\x01\x02\ufffd\ufffd hi")]  # empty, the prompt again, junk
    system = [{"role": "system", "content": "Be brief."}, *chat("Why is the sky blue? " * 20, "Rayleigh scattering.")]
    short, long = chat("Hi", "A greeting."), chat("Tell me a story.", "Once upon a time " * 50)
    cfg = cu.Curate(min_prompt_chars=5, max_prompt_chars=200, max_answer_chars=300)
    kept, counts = cu.curate([], good + bad_format + [system, short, long], cfg)
    assert kept == good and counts["bad_format"] == 3 and counts["too_short"] == 1 and counts["too_long"] == 2
    assert counts["read"] == 11 and counts["kept"] == 5
    assert cu.curate([], good + bad_format, cu.Curate(filter_format=False))[1]["kept"] == 8
    assert cu.curate([], [system, short, long], cu.Curate())[1]["kept"] == 3  # length filters off by default


@pytest.fixture(scope="module")
def planted():
    """Real held-out PIQA items as the farm scores them: the doc ids `tasks.sample` draws from the held-out half,
    rendered by lm-eval's own definition (the prompt it scores, the correct choice) — the ten first whose answer
    is long enough to hold a 13-word span."""
    from lm_eval.api.task import ConfigurableTask

    [cfg] = taskdata.task_configs(["piqa"])
    task = ConfigurableTask(config=cfg)
    docs = task.validation_docs()
    out = []
    for i in taskdata.sample("piqa", 200, 0, held_out=True):
        doc = docs[i]
        answer = task.doc_to_choice(doc)[task.doc_to_target(doc)]
        if len(cu.words(answer)) >= 13:
            out.append(chat(str(task.doc_to_text(doc)), answer.strip()))
    assert len(out) >= 10
    return out[:10]


def test_planted_held_out_items_are_caught_counted_and_refused(planted, tmp_path):
    scored = cu.Curate(scored={"piqa": "held_out", "arc_easy": "split"})
    data = clean_chats(190) + planted  # 10 of 200: 5 %
    with pytest.raises(ValueError, match=r"sft step 'x': curate\.max_contaminated: 10 of the files' 200 chats "
                                         r"\(5\.0 %\).*\(piqa 10;.*above max_contaminated 0\.01"):
        cu.curate([], data, scored, "sft step 'x'")
    kept, counts = cu.curate([], data, scored.model_copy(update={"max_contaminated": 0.1}))
    assert kept == clean_chats(190) and counts["contaminated"] == 10 == counts["contaminated.piqa"]
    assert counts["contaminated.arc_easy"] == 0 and counts["items_checked.piqa"] > 600
    # below the threshold: dropped and counted, not refused; the farm's own (a task's train half) is never refused
    assert cu.curate([], clean_chats(190) + planted[:1], scored)[1]["contaminated.piqa"] == 1
    assert cu.curate(planted, clean_chats(10), scored)[1]["contaminated"] == 10
    # the same chats against the other half, or with decontamination off, are not contaminated
    assert cu.curate([], data, cu.Curate(scored={"arc_easy": "split"}))[1]["contaminated"] == 0
    assert cu.curate([], data, scored.model_copy(update={"decontaminate": False}))[1]["kept"] == 200

    # at the sweep's validation, from the files alone, naming the field and the lines
    files = write_jsonl(tmp_path / "chats.jsonl", data)
    text = (f"name: t\npipelines: [[{{method: sft, files: [{files}]}}]]\nexports: [{{format: gguf, quant: F16}}]\n"
            "tasks: {items: {piqa: 20}}\n")
    with pytest.raises(SpecError) as e:
        spec.loads(text)
    [p] = e.value.problems
    assert p.startswith("pipelines[0][0].curate.max_contaminated: 10 of the files' 200 chats") and "piqa 10" in p
    assert f"{files}:191" in p  # the first planted line
    spec.loads(text.replace("files: [", "curate: {max_contaminated: 0.1}, files: ["))  # the threshold raised: valid
    spec.loads(text.replace("tasks: {items: {piqa: 20}}\n", ""))  # nothing scored: nothing to keep out


def test_the_sft_stage_refuses_before_training(planted, tmp_path, tiny_model_dir, monkeypatch):
    from farm.compress import run_method
    from farm.inputs import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    files = write_jsonl(tmp_path / "chats.jsonl", clean_chats(190) + planted)
    step = {"method": "sft", "files": [str(files)], "curate": {"scored": {"piqa": "held_out"}}}
    with pytest.raises(ValueError, match=r"sft step 'chats-r16': curate\.max_contaminated: 10 of"):
        run_method("sft", tiny_model_dir, step, np.zeros(1, dtype=np.int64), tmp_path / "out", 1)


def test_the_sft_stage_identity_follows_the_tasks_the_sweep_scores(tiny_model_dir, tmp_path):
    files = write_jsonl(tmp_path / "chats.jsonl", clean_chats(50))
    base = (f"name: t\nbase: {{model: {tiny_model_dir}}}\nexports: [{{format: gguf, quant: F16}}]\n"
            f"pipelines: [[{{method: prune_layers, drop: 1}}, {{method: sft, files: [{files}]STEP}}]]\n")

    def compress(text: str) -> dict[str, dict]:
        g = gridmod.build(spec.loads(text))
        return {s.params["step"]["method"]: {"id": sid, "step": s.params["step"]}
                for sid, s in g.stages.items() if s.kind == "compress"}

    def sweep(tasks: str = "", step: str = "") -> dict[str, dict]:
        return compress(base.replace("STEP", step) + (f"tasks: {{items: {tasks}}}\n" if tasks else ""))

    none, piqa, both = sweep(), sweep("{piqa: 20}"), sweep("{piqa: 20, arc_easy: 10}")
    assert none["sft"]["step"]["curate"]["scored"] is None
    assert piqa["sft"]["step"]["curate"]["scored"] == {"piqa": "split"}
    assert both["sft"]["step"]["curate"]["scored"] == {"piqa": "split", "arc_easy": "split"}
    assert len({none["sft"]["id"], piqa["sft"]["id"], both["sft"]["id"]}) == 3
    assert none["prune_layers"]["id"] == piqa["prune_layers"]["id"] == both["prune_layers"]["id"]
    assert sweep("{piqa: 50}")["sft"]["id"] == piqa["sft"]["id"]  # the items it is checked against did not change
    trained = sweep("{piqa: 20}", ", task: piqa")
    assert trained["sft"]["step"]["curate"]["scored"] == {"piqa": "held_out"}  # its held-out half is what is scored
    off = ", curate: {decontaminate: false}"
    assert sweep("{piqa: 20}", off)["sft"]["id"] == sweep("", off)["sft"]["id"]
    # the cell's label does not change with the default curation
    g = gridmod.build(spec.loads(base.replace("STEP", "") + "tasks: {items: {piqa: 20}}\n"))
    assert [spec.step_label(s) for s in g.cells[-1].spec["compress"]] == ["prune_layers-drop1", "sft-chats-r16"]
    # ... and curation switched off shows in it, so two cells that differ only there are told apart
    g = gridmod.build(spec.loads(base.replace("STEP", off) + "tasks: {items: {piqa: 20}}\n"))
    assert [spec.step_label(s) for s in g.cells[-1].spec["compress"]][-1] == "sft-chats-r16-nodecon"
