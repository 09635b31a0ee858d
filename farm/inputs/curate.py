"""Curation of instruction data before supervised fine-tuning (farm/compress/sft.py, its `curate:` options).

Each chat read is counted once, under the first rule that drops it, in this order:

1. contaminated  it shares a span of words with an item the sweep scores (below). Counted per task as well
                 (`contaminated.<task>`); if more than `max_contaminated` of the user's chats (its files) are,
                 the step is refused: data that close to a benchmark tends to hold paraphrases no span catches.
                 A task's train half is decontaminated too but never refused: the farm's own halves share text
                 (BoolQ asks several questions of one passage, HellaSwag ends one context several ways; about
                 13 % and 11 % of their train halves touch a held-out item, PIQA 1 %, ARC and OpenBookQA none).
2. bad_format    (`filter_format`) an empty answer, an answer that repeats its prompt, or more than `max_junk`
                 of the chat's characters junk: control, format, private-use or unassigned code points and
                 U+FFFD (the mark a broken decoding leaves).
3. too_short / too_long   a prompt (every message before the answer) or an answer (the last message) outside
                 [min_*_chars, max_*_chars]; off by default (sft's max_len cuts long chats to its tokens).
4. exact_dups    (`dedupe`) the same normalised text as an earlier chat (system messages left out: a shared
                 system prompt does not make chats alike, nor does a different one make them differ).
5. near_dups     (`dedupe`, `near_dup`) word 3-gram shingles whose Jaccard similarity to an earlier kept
                 chat's is at least `near_dup`: MinHash LSH (datasketch) proposes the pairs, their exact
                 Jaccard decides. The first of a group is kept.

Normalised text is lm-eval's decontamination janitor's (lm_eval.decontamination.janitor: ASCII letters to lower
case, ASCII punctuation deleted, words split on whitespace), rewritten here because importing the janitor prints
a traceback when its C++ helper is not built (tests/test_curate.py checks both give the same words and n-grams).

Decontamination (GPT-3's and lm-eval's rule): an item is every text field of its row in the split the farm
scores it from (farm.inputs.taskdata: question, passage, choices, ...); a chat is contaminated by it when the
chat's words hold one of the item's `ngram`-word spans (13 by default), or a whole field shorter than that of
at least 8 words (GPT-3's floor: shorter fields are common phrases, and are not checked). The items are those
the sweep can score: the held-out half of a task some step trains on (`halves`), the whole split of the others
— the farm fills `scored` in from the sweep's `tasks:` section (farm.plan.grid), so a change of the scored tasks
makes a new stage. Curation defaults: dedupe and decontaminate on, length filters off.
"""

from __future__ import annotations

import functools
import json
import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from farm.inputs.taskdata import TASKS, halves, split_dir

SHORTEST = 8  # words: a field shorter than `ngram` is checked whole from this length on (GPT-3's floor)
SHINGLE = 3  # words per shingle of the near-duplicate test
_TABLE = str.maketrans(string.ascii_lowercase + string.ascii_uppercase, string.ascii_lowercase * 2,
                       string.punctuation)  # the janitor's translation table
Pool = Literal["held_out", "split"]


class Curate(BaseModel):
    """How an sft step curates its chats before training (farm/inputs/curate.py)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    dedupe: bool = Field(True, description="Drop chats whose normalised text repeats an earlier chat's, and, "
                         "with near_dup, near duplicates of one.")
    near_dup: float | None = Field(0.8, gt=0, le=1, description="Drop a chat whose word 3-gram shingles have at "
                                   "least this Jaccard similarity with an earlier kept chat's (MinHash LSH); "
                                   "null: exact duplicates only.")
    filter_format: bool = Field(True, description="Drop chats with an empty answer, an answer equal to the "
                                "prompt, or more than max_junk of junk characters.")
    max_junk: float = Field(0.1, ge=0, le=1, description="Share of a chat's characters that may be junk "
                            "(control, format, private-use, unassigned code points, U+FFFD).")
    min_prompt_chars: int = Field(0, ge=0, description="Drop chats whose prompt is shorter (characters).")
    max_prompt_chars: int | None = Field(None, ge=1, description="Drop chats whose prompt is longer; null: any.")
    min_answer_chars: int = Field(0, ge=0, description="Drop chats whose answer is shorter (characters).")
    max_answer_chars: int | None = Field(None, ge=1, description="Drop chats whose answer is longer; null: any.")
    decontaminate: bool = Field(True, description="Drop chats that share an ngram-word span with an item the "
                                "sweep scores (every task of its tasks section).")
    ngram: int = Field(13, ge=4, le=50, description="Words per span of the contamination test (13: GPT-3's, "
                       "lm-eval's).")
    max_contaminated: float = Field(0.01, ge=0, le=1, description="Refuse the step when more than this share of "
                                    "its files' chats is contaminated (they are dropped either way; a task's "
                                    "train half is never refused), at the sweep's validation and in the stage.")
    scored: dict[Literal[tuple(TASKS)], Pool] | None = Field(  # type: ignore[valid-type]
        None, description="The items checked against, by task: 'held_out' its held-out half, 'split' the whole "
        "split. Filled in by the farm from the sweep's tasks section (leave it out); tasks given here are "
        "checked as well.")


def words(text: str) -> list[str]:
    """The janitor's normalisation, split into words."""
    return text.translate(_TABLE).split()


def ngrams(ws: list[str], n: int) -> set[str]:
    return {" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def prompt_of(chat: list[dict]) -> str:
    return "\n".join(m["content"] for m in chat[:-1])


# ---- decontamination
def _strings(value) -> list[str]:
    """Every text field of a row, nested ones (a choices list) included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [s for v in value for s in _strings(v)] if isinstance(value, list) else []


def item_spans(fields: list[str], n: int) -> set[str]:
    """What marks a chat as holding this item: its fields' n-word spans, and fields shorter than n words whole
    (from SHORTEST words on)."""
    out: set[str] = set()
    for field in fields:
        ws = words(field)
        out |= ngrams(ws, n) if len(ws) >= n else ({" ".join(ws)} if len(ws) >= min(SHORTEST, n) else set())
    return out


def rows(task: str) -> list[dict]:
    """The rows of a task's split as the farm scores it (doc id = row number), read from its Arrow files."""
    import pyarrow as pa

    d = split_dir(task)
    files = [f["filename"] for f in json.loads((d / "state.json").read_text())["_data_files"]]
    out: list[dict] = []
    for f in files:
        with pa.memory_map(str(d / f)) as source:
            out += pa.ipc.open_stream(source).read_all().to_pylist()
    return out


@functools.lru_cache(maxsize=32)
def task_spans(task: str, pool: str, n: int) -> tuple[frozenset[str], int]:
    """The spans of a task's items in a pool ('held_out' half or whole 'split'), and how many items have one."""
    all_rows = rows(task)
    ids = halves(task)[1] if pool == "held_out" else range(len(all_rows))
    spans, checked = set(), 0
    for i in ids:
        s = item_spans(_strings(all_rows[i]), n)
        spans |= s
        checked += bool(s)
    return frozenset(spans), checked


def contamination(chats: list[list[dict]], tasks: dict[str, str], n: int) -> tuple[list[list[str]], dict]:
    """Per chat, the tasks whose scored items it holds a span of; and per task, the items that could be checked."""
    index = {t: task_spans(t, pool, n) for t, pool in sorted(tasks.items())}
    sizes = sorted({s.count(" ") + 1 for spans, _ in index.values() for s in spans})
    out = []
    for c in chats:
        ws = words(" ".join(m["content"] for m in c))
        grams = set().union(*(ngrams(ws, k) for k in sizes)) if sizes else set()
        out.append([t for t, (spans, _) in index.items() if not grams.isdisjoint(spans)])
    return out, {t: checked for t, (_, checked) in index.items()}


def refusal(found: list[list[str]], chats: list[list[dict]], cfg: Curate, where: list[str] | None = None) -> str | None:
    """The problem when too many chats are contaminated, as 'curate.max_contaminated: ...', or None."""
    bad = [i for i, tasks in enumerate(found) if tasks]
    if not chats or len(bad) / len(chats) <= cfg.max_contaminated:
        return None
    per_task = {t: sum(t in f for f in found) for t in sorted({t for f in found for t in f})}
    examples = [where[i] if where else repr(prompt_of(chats[i])[:60]) for i in bad[:3]]
    return (f"curate.max_contaminated: {len(bad)} of the files' {len(chats)} chats ({100 * len(bad) / len(chats):.1f} %) share "
            f"a {cfg.ngram}-word span with items the sweep scores ({', '.join(f'{t} {k}' for t, k in per_task.items())}"
            f"; e.g. {', '.join(examples)}), above max_contaminated {cfg.max_contaminated:g}: the tuned model would "
            "be scored on what it was trained on. Remove those chats from the data, or raise curate.max_contaminated "
            "to train on the rest (they are dropped either way)")


# ---- format, length, duplicates
def junk_share(text: str) -> float:
    junk = sum(1 for ch in text if (not ch.isprintable() and not ch.isspace()) or ch == "\ufffd")
    return junk / max(len(text), 1)


def verdict(chat: list[dict], cfg: Curate) -> str | None:
    """'bad_format', 'too_short', 'too_long' or None for a chat that passes."""
    prompt, answer = prompt_of(chat), chat[-1]["content"]
    if cfg.filter_format and (not answer.strip() or words(answer) == words(prompt)
                              or junk_share(prompt + answer) > cfg.max_junk):
        return "bad_format"
    if len(prompt) < cfg.min_prompt_chars or len(answer) < cfg.min_answer_chars:
        return "too_short"
    if (cfg.max_prompt_chars is not None and len(prompt) > cfg.max_prompt_chars) or \
            (cfg.max_answer_chars is not None and len(answer) > cfg.max_answer_chars):
        return "too_long"
    return None


def dedupe_text(chat: list[dict]) -> list[str]:
    return words("\n".join(m["content"] for m in chat if m["role"] != "system"))


def shingles(ws: list[str]) -> set[str]:
    return ngrams(ws, SHINGLE) if len(ws) >= SHINGLE else {" ".join(ws)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicates:
    """Is a text a near duplicate of one kept before? MinHash LSH (datasketch) finds the candidates, the exact
    Jaccard of the shingle sets decides."""

    def __init__(self, threshold: float, num_perm: int = 128):
        from datasketch import MinHash, MinHashLSH

        self.threshold, self.kept = threshold, {}
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.proto = MinHash(num_perm=num_perm, seed=1)

    def seen(self, key: int, sh: set[str]) -> bool:
        m = self.proto.copy()
        m.update_batch([s.encode() for s in sh])
        if any(jaccard(sh, self.kept[k]) >= self.threshold for k in self.lsh.query(m)):
            return True
        self.lsh.insert(key, m)
        self.kept[key] = sh
        return False


def curate(own: list[list[dict]], given: list[list[dict]], cfg: Curate, what: str = "the step") -> tuple[list, dict]:
    """The chats that pass, in their order (the farm's own, from a task's train half, then the user's), and the
    counts (the step's info: curate.*). Raises ValueError, naming `what`, when too many of the user's chats are
    contaminated; the farm's own are dropped and counted, never refused (a task's halves can share a passage)."""
    chats = own + given
    counts = dict.fromkeys(["exact_dups", "near_dups", "too_short", "too_long", "bad_format", "contaminated"], 0)
    found: list[list[str]] = [[] for _ in chats]
    if cfg.decontaminate and cfg.scored:
        found, checked = contamination(chats, cfg.scored, cfg.ngram)
        problem = refusal(found[len(own):], given, cfg)
        if problem:
            raise ValueError(f"{what}: {problem}")
        counts.update({f"contaminated.{t}": sum(t in f for f in found) for t in checked})
        counts.update({f"items_checked.{t}": k for t, k in checked.items()})
    seen: set[str] = set()
    near = NearDuplicates(cfg.near_dup) if cfg.dedupe and cfg.near_dup is not None else None
    kept = []
    for i, chat in enumerate(chats):
        why = "contaminated" if found[i] else verdict(chat, cfg)
        if why is None and cfg.dedupe:
            ws = dedupe_text(chat)
            key = " ".join(ws)
            why = "exact_dups" if key in seen else ("near_dups" if near and near.seen(i, shingles(ws)) else None)
            seen.add(key)
        if why:
            counts[why] += 1
        else:
            kept.append(chat)
    return kept, {"read": len(chats), "kept": len(kept), **counts}


def file_problems(files: list[str], cfg: Curate) -> list[str]:
    """At the sweep's validation: the contamination of the files' chats (cheap: no model, no lm-eval), as
    'curate.max_contaminated: ...' naming a few 'file:line's; empty when it is within bounds or not checked."""
    from farm.inputs.instructions import located

    if not (cfg.decontaminate and cfg.scored and files):
        return []
    rows_ = located(files)
    chats, where = [c for _, c in rows_], [w for w, _ in rows_]
    found, _ = contamination(chats, cfg.scored, cfg.ngram)
    problem = refusal(found, chats, cfg, where)
    return [problem] if problem else []


def with_scored(step: dict, scored: dict[str, str]) -> dict:
    """A step's data with the sweep's scored tasks in its curate options (the stage id then follows them);
    unchanged when it does not decontaminate, or when its curate options are not a mapping (validation says)."""
    cur = step.get("curate", {})
    if not isinstance(cur, dict) or cur.get("decontaminate", True) is False:
        return step
    given = cur.get("scored") if isinstance(cur.get("scored"), dict) else {}
    return {**step, "curate": {**cur, "scored": {**given, **scored} or None}}

