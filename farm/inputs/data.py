"""Calibration and evaluation text: the embedded corpus (Python's pydoc topics) or the user's files.

Documents (pydoc topics, or paragraphs of the user's files) are split by a hash of their text into
two disjoint parts, so no evaluation text is ever seen during calibration.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from farm.errors import FarmError

EVAL_SHARE = 4  # one document in four goes to evaluation


def documents(files: list[str]) -> dict[str, str]:
    if not files:
        from pydoc_data.topics import topics

        return dict(topics)
    docs: dict[str, str] = {}
    for f in files:
        text = Path(f).expanduser().read_text(encoding="utf-8")
        for i, para in enumerate(p for p in text.split("\n\n") if p.strip()):
            docs[f"{Path(f).name}#{i}"] = para
    return docs


def is_eval(text: str) -> bool:
    """Decided by the document's content: several pydoc topics ('if', 'else', ...) share one text,
    and a split by name would put the same text on both sides."""
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % EVAL_SHARE == 0


def split(files: list[str]) -> tuple[str, str]:
    """(calibration text, evaluation text), disjoint by document content."""
    docs = documents(files)
    unique = list(dict.fromkeys(docs[k] for k in sorted(docs)))  # identical documents once, stable order
    calib = [t for t in unique if not is_eval(t)]
    evals = [t for t in unique if is_eval(t)]
    if not calib or not evals:
        raise FarmError("data.files: need at least two paragraphs (blank-line separated) to split calibration/eval")
    return "\n\n".join(calib), "\n\n".join(evals)


HINT = {"calibration": "calib_tokens", "long-context": "long_windows / long_window_tokens"}


def take_tokens(ids: list[int], n: int, what: str) -> list[int]:
    if len(ids) < n:
        raise FarmError(
            f"data: the {what} text has {len(ids)} tokens but {n} are needed — add text (data.files) "
            f"or lower data.{HINT.get(what, 'eval_windows / eval_window_tokens')}"
        )
    return ids[:n]
