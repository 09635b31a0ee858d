"""Supervised fine-tuning with LoRA or QLoRA (peft, bitsandbytes NF4): the model learns to answer
instructions — chats from the user's JSONL files, or the train half of a task's split (farm.instructions) —
rendered with its own chat template, the loss on the answer's tokens only. A share of the examples is held
out and its loss measured as training goes (`curve`: the training loss per step and the validation loss
every eval_every steps, logged to MLflow as the cell's `train_loss` / `val_loss` histories). The adapters are
then merged into a dense checkpoint of the same shape (QLoRA: dequantized first; lora.dense_merge), which
every exporter reads; the unmerged adapter is kept beside it (`adapter/`, peft's own format, and
`adapter/adapter-f16.gguf` for llama.cpp: llama-server serves one base with several such adapters, `farm serve
--lora`).

The chats are curated first (farm/inputs/curate.py, the `curate:` options): duplicates, near duplicates and
malformed chats dropped, and every chat that shares a 13-word span with an item the sweep scores (its tasks
section) dropped too — the step refused when too many of the files' chats do, at the sweep's validation already.
The counts are the step's info (`curate.*`).

Unlike `lora` (healing towards the base model on the calibration text), nothing here reads the calibration
text or a teacher.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from farm.compress.common import save_with_tokenizer
from farm.compress.lora import TARGETS, dense_merge, load_nf4, logit_gap, nf4_only
from farm.inputs import curate as curation
from farm.inputs.instructions import IGNORE
from farm.plugin import PositiveGrid, StepOptions


class Options(StepOptions):
    """Fine-tunes on instruction data with LoRA adapters (QLoRA with base_bits: 4), then merges them."""
    LABEL = "{source}-r{rank}"
    GRID = ("rank",)
    TAGS = {"base_bits": "nf{base_bits}", "epochs": "e{epochs}", "keep": "{keep}"}
    method: Literal["sft"]
    task: str | None = Field(None, description="Train on this task's train half (e.g. piqa, arc_easy): lm-eval's "
                             "prompt as the instruction, the correct choice as the answer; the sweep then scores "
                             "that task on its held-out half only.")
    files: list[str] = Field([], description="JSONL files of chats ({messages: [...]} or {instruction, input?, "
                             "response}); with task, both are used.")
    examples: int | None = Field(None, ge=1, description="Use at most this many training chats (a seeded sample); "
                                 "null: all.")
    val_examples: int = Field(64, ge=1, le=100_000, description="Chats held out of training for the validation loss.")
    rank: PositiveGrid = Field(16, description="LoRA rank (> 0); a list is a grid.")
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: list[Literal[TARGETS]] = Field(list(TARGETS), min_length=1)  # type: ignore[valid-type]
    lr: float = Field(2e-4, gt=0, le=1)
    epochs: float = Field(1.0, gt=0, le=100, description="Passes over the training chats.")
    batch: int = Field(8, ge=1, le=256, description="Chats per step (padded to the longest).")
    max_len: int = Field(256, ge=16, le=8192, description="Tokens per chat at most (longer ones are cut).")
    eval_every: int = Field(20, ge=1, description="Steps between two validation losses.")
    keep: Literal["last", "best"] = Field("last", description="The adapters kept: 'last' those of the last step; "
                                          "'best' those at the lowest validation loss (early stopping on the "
                                          "held-out chats; kept_step in the step's info says which).")
    base_bits: int | None = Field(None, description="4: QLoRA (the base frozen in bitsandbytes NF4); null: LoRA.")
    seed: int = Field(0, ge=0)
    curate: curation.Curate = Field(default_factory=curation.Curate, description="Curation of the chats before "
                                  "training: duplicates, malformed chats, and chats holding items the sweep scores.")

    _nf4 = field_validator("base_bits")(lambda v: nf4_only(v))

    @model_validator(mode="after")
    def _some_data(self):
        if self.task is None and not self.files:
            raise ValueError("give the instruction data: task (a task's train half) and/or files (JSONL chats)")
        return self

    @classmethod
    def label_of(cls, values: dict) -> str:
        source = values.get("task") or Path((values.get("files") or ["chats"])[0]).stem
        curate = values.get("curate") if isinstance(values.get("curate"), dict) else {}
        off = [tag for key, tag in (("decontaminate", "nodecon"), ("dedupe", "nodedupe")) if curate.get(key) is False]
        return "-".join([super().label_of({**values, "source": source}), *off])

    @classmethod
    def with_scored(cls, step: dict, scored: dict[str, str]) -> dict:
        return curation.with_scored(step, scored)  # curate.scored: the items its chats must not hold

    def check(self, shape):
        from farm.errors import FarmError
        from farm.inputs import taskdata as tasks
        from farm.inputs.instructions import file_problems

        problems = [f"files[{i}]: {p}" for i, f in enumerate(self.files) for p in file_problems(f)]
        if not problems:
            try:
                problems += curation.file_problems(self.files, self.curate)
            except FarmError:  # the task data is not installed: the tasks stage reports it
                pass
        if self.task is not None and self.task not in tasks.TASKS:
            problems.append(f"task: '{self.task}' is not one of {', '.join(tasks.TASKS)}")
        elif self.task in tasks.MULTIPLE_INPUT:
            problems.append(f"task: '{self.task}' varies the context, not the answer: it makes no instruction pairs; "
                            "use another task")
        return problems, shape


def batches(encoded: list[tuple[list[int], list[int]]], batch: int, pad_id: int, rng: random.Random, epochs: float):
    """(ids, labels, attention mask) tensors, right-padded, over `epochs` shuffled passes."""
    steps = max(1, math.ceil(len(encoded) * epochs / batch))
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            order += rng.sample(range(len(encoded)), len(encoded))
        rows = [encoded[i] for i in order[:batch]]
        del order[:batch]
        yield padded(rows, pad_id)


def padded(rows, pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (i, lab) in enumerate(rows):
        ids[r, :len(i)], labels[r, :len(lab)], mask[r, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return ids, labels, mask


def answer_loss(model, ids, labels, mask):
    """Mean cross-entropy over the answers' tokens (labels other than IGNORE), next-token shifted."""
    import torch.nn.functional as F

    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def lora_state(model) -> dict:
    """A copy of the adapters' weights (a few MB), to return to the best validation point."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def val_loss(model, rows, pad_id: int, batch: int) -> float:
    """Token-weighted mean answer loss over the held-out chats."""
    import torch

    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for b in range(0, len(rows), batch):
            ids, labels, mask = padded(rows[b:b + batch], pad_id)
            n = float((labels[:, 1:] != IGNORE).sum())
            total += float(answer_loss(model, ids, labels, mask)) * n
            count += n
    model.train()
    return total / max(count, 1.0)


def apply(model_dir: Path, opt: Options, calib: np.ndarray, out: Path, threads: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from farm.inputs import instructions
    from farm.inputs.models import load_model, load_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(opt.seed)
    rng = random.Random(opt.seed)
    tok = load_tokenizer(model_dir)
    own = instructions.from_task(opt.task) if opt.task else []
    chats, curated = curation.curate(own, instructions.from_files(opt.files), opt.curate,
                                   f"sft step '{Options.label_of(opt.model_dump())}'")
    rng.shuffle(chats)
    if len(chats) <= opt.val_examples:
        raise ValueError(f"sft: {len(chats)} chats (of {curated['read']} read: curation counted {curated}), but "
                         f"val_examples holds out {opt.val_examples}; give more data or lower val_examples")
    val_chats, train_chats = chats[:opt.val_examples], chats[opt.val_examples:]
    if opt.examples:
        train_chats = train_chats[:opt.examples]
    train_rows = [instructions.encode(tok, c, opt.max_len) for c in train_chats]
    val_rows = [instructions.encode(tok, c, opt.max_len) for c in val_chats]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    if opt.base_bits == 4:
        model = prepare_model_for_kbit_training(load_nf4(model_dir), use_gradient_checkpointing=False)
    else:
        model = load_model(model_dir)
    config = LoraConfig(r=opt.rank, lora_alpha=opt.alpha, lora_dropout=opt.dropout,
                        target_modules=list(opt.targets), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    steps = max(1, math.ceil(len(train_rows) * opt.epochs / opt.batch))
    optim = torch.optim.AdamW(params, lr=opt.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda i: 1.0 - i / steps)
    curve = {"train_loss": [], "val_loss": [[0, val_loss(peft_model, val_rows, pad_id, opt.batch)]]}
    best = (curve["val_loss"][0][1], 0, lora_state(peft_model))  # (validation loss, step, adapter weights)
    t0 = time.time()
    peft_model.train()
    for step, (ids, labels, mask) in enumerate(batches(train_rows, opt.batch, pad_id, rng, opt.epochs), 1):
        loss = answer_loss(peft_model, ids, labels, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        curve["train_loss"].append(round(loss.item(), 5))
        if step % opt.eval_every == 0 or step == steps:
            curve["val_loss"].append([step, val_loss(peft_model, val_rows, pad_id, opt.batch)])
            print(f"farm: sft: step {step}/{steps}, train loss {loss.item():.3f}, validation loss "
                  f"{curve['val_loss'][-1][1]:.3f} ({time.time() - t0:.0f} s)", flush=True)  # in the stage's log
            if opt.keep == "best" and curve["val_loss"][-1][1] < best[0]:
                best = (curve["val_loss"][-1][1], step, lora_state(peft_model))
    train_seconds = time.time() - t0
    kept_val, kept_step = curve["val_loss"][-1][1], steps
    if opt.keep == "best":
        kept_val, kept_step, state = best
        peft_model.load_state_dict(state, strict=False)  # only the adapters' tensors: the base is untouched
    peft_model.eval()
    adapter = out.parent / "adapter"
    peft_model.save_pretrained(adapter)  # the adapter alone (adapter_config.json + safetensors), peft's format
    adapter_gguf = adapter_as_gguf(adapter, model_dir)
    probe = torch.tensor([train_rows[0][0]])
    if opt.base_bits == 4:
        merged = dense_merge(peft_model, model_dir)
        gap = logit_gap(peft_model, merged, probe)
    else:
        with torch.no_grad():
            before = peft_model(probe, use_cache=False).logits
            merged = peft_model.merge_and_unload()
            gap = float((merged(probe, use_cache=False).logits - before).abs().max())
    if not gap < 1e-2:
        raise RuntimeError(f"sft: the merged model's logits differ from the adapted model's by {gap:.3g} — report this")
    save_with_tokenizer(merged, model_dir, out)
    tail = max(1, len(curve["train_loss"]) // 10)
    return {"objective": "sft", "steps": steps, "examples": len(train_rows), "val_examples": len(val_rows),
            "answer_tokens": sum(sum(t != IGNORE for t in labels) for _, labels in train_rows),
            "loss_first": curve["train_loss"][0], "loss_last": round(float(np.mean(curve["train_loss"][-tail:])), 5),
            "val_loss_first": round(curve["val_loss"][0][1], 5), "val_loss_last": round(curve["val_loss"][-1][1], 5),
            "train_seconds": round(train_seconds, 1), "trainable_params": sum(p.numel() for p in params),
            "kept_step": kept_step, "val_loss_kept": round(kept_val, 5), "base_bits": opt.base_bits or 32, "merge_max_abs_logit_diff": round(gap, 6), "adapter_dir": "adapter",
            "adapter_gguf": adapter_gguf, "curve": curve, **{f"curate.{k}": v for k, v in curated.items()}}


def adapter_as_gguf(adapter: Path, model_dir: Path) -> str | None:
    """The adapter for llama.cpp too (llama-server --lora; `farm serve --lora`): adapter/adapter-f16.gguf,
    by llama.cpp's own converter. Its name relative to the stage, or None for an architecture the converter
    does not know (the merged model is still there)."""
    from farm.errors import ToolError
    from farm.export.gguf_export import convert_adapter

    try:
        convert_adapter(adapter, model_dir, adapter / "adapter-f16.gguf", "f16")
    except ToolError as e:
        print(f"farm: sft: the adapter stays in peft's format only ({str(e).splitlines()[0][:200]})", flush=True)
        return None
    return "adapter/adapter-f16.gguf"
