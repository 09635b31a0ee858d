"""Instruction data for supervised fine-tuning: chats from a user's JSONL files or from one half of a task's
validation split, rendered with the model's own chat template, with labels on the response tokens only.

A JSONL line is either {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} (the
last message is the assistant's answer the loss is on) or {"instruction": "...", "input": "...",
"response": "..."} (`input` optional; `output` is accepted for `response`).

A task's pairs come from lm-eval's own definition of the task (the prompt it scores, `doc_to_text`, as the
user's message; the correct choice, `doc_to_choice[doc_to_target]`, as the answer) over the rows of the
split's *train* half. The halves are fixed per task (`tasks.halves`), so a sweep that trains on a task
scores it on the held-out half, which no training step has seen.
"""

from __future__ import annotations

import json
from pathlib import Path

IGNORE = -100  # label of a token the loss skips (the prompt, the padding): torch's cross_entropy default


def file_problems(path: str | Path) -> list[str]:
    """What is wrong with a JSONL file of chats, each as 'line N: ...'; empty when every line is usable."""
    p = Path(path).expanduser()
    if not p.is_file():
        return [f"file '{p}' does not exist"]
    problems = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            chat(json.loads(line))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            problems.append(f"file '{p}' line {n}: {e}")
        if len(problems) >= 5:
            break
    return problems


def chat(row: dict) -> list[dict]:
    """One JSONL row as a list of messages ending with the assistant's answer."""
    if not isinstance(row, dict):
        raise TypeError("each line must be a JSON object with 'messages', or 'instruction' and 'response'")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in msgs):
            raise ValueError("'messages' must be a non-empty list of {role: system|user|assistant, content: str}")
        if msgs[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in msgs):
            raise ValueError("'messages' must hold a user message and end with the assistant's answer")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    response = row.get("response", row.get("output"))
    if not isinstance(row.get("instruction"), str) or not isinstance(response, str) or not response:
        raise ValueError("needs 'messages', or 'instruction' and 'response' (strings)")
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": response}]


def from_files(files: list[str]) -> list[list[dict]]:
    return [c for _, c in located(files)]


def located(files: list[str]) -> list[tuple[str, list[dict]]]:
    """('file:line', chat) for every chat of the files, in order."""
    out = []
    for f in files:
        for n, line in enumerate(Path(f).expanduser().read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                out.append((f"{f}:{n}", chat(json.loads(line))))
    return out


def from_task(task: str, ids: list[int] | None = None) -> list[list[dict]]:
    """The train half of a task's split (or the items `ids`) as chats: lm-eval's prompt as the user's message,
    the correct choice as the answer (its leading space, lm-eval's target delimiter, dropped)."""
    from lm_eval.api.task import ConfigurableTask

    from farm.inputs import taskdata as tasks

    if task in tasks.MULTIPLE_INPUT:
        raise ValueError(f"task '{task}' varies the context, not the answer; it cannot become instruction pairs")
    [cfg] = tasks.task_configs([task])
    t = ConfigurableTask(config=cfg)
    docs = t.validation_docs()  # with the task's own process_docs, indexed as lm-eval's doc ids
    out = []
    for i in tasks.halves(task)[0] if ids is None else ids:
        doc = docs[i]
        choices, target = t.doc_to_choice(doc), t.doc_to_target(doc)
        answer = choices[target] if isinstance(target, int) else str(target)
        out.append([{"role": "user", "content": str(t.doc_to_text(doc))}, {"role": "assistant", "content": answer.strip()}])
    return out


def encode(tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """(token ids, labels): the chat through the tokenizer's chat template, labels IGNORE except on the
    final answer's tokens (and the template's end-of-turn after it). Cut to max_len from the right."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template: supervised fine-tuning renders chats with it "
                         "(set tokenizer_config.json's chat_template, or use a model that ships one)")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
    full = tokenizer.apply_chat_template(messages, tokenize=True)
    prompt, full = list(_ids(prompt)), list(_ids(full))
    if full[:len(prompt)] != prompt:
        raise ValueError("the chat template renders the conversation without its generation prompt as a prefix; "
                         "farm cannot tell the answer's tokens apart")
    labels = [IGNORE] * len(prompt) + full[len(prompt):]
    return full[:max_len], labels[:max_len]


def _ids(x):
    return x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x
