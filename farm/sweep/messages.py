"""How a sweep's problems read: pydantic's errors turned into one line each that names the field path, the bad
value, what is allowed and the nearest name ("unknown method 'gtpq' — did you mean 'gptq'?")."""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

from farm.compress import METHODS
from farm.export import FORMATS
from farm.runtimes import RUNTIMES, runtimes_for


def _runtime_hint(loc: tuple, key: str) -> str:
    """A runtime's option written on the export itself (as `amx:` was before runtimes had names)."""
    fmt = loc[2] if len(loc) == 4 and loc[0] == "exports" and loc[2] in FORMATS else None
    for name in runtimes_for(fmt) if fmt else ():
        if key in RUNTIMES.options(name).model_fields:
            return f"it is an option of the {name} runtime: write runtime: {{name: {name}, {key}: ...}}"
    return "remove it or check its spelling"


def _branch_names() -> set[str]:
    return set(METHODS.names()) | set(FORMATS.names())


def _suggest(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" — did you mean '{close[0]}'?" if close else ""


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _branch_names() or part == "[key]" or str(part).startswith(("function-", "list[", "int", "str", "bool")):
            continue  # pydantic's union branch names are noise for a user
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _format_error(err: dict) -> str:
    where = _loc(err["loc"])
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":  # the last part is the user's key, whatever it is called
        parent, key = _loc(err["loc"][:-1]), err["loc"][-1]
        where = f"{parent}.{key}" if err["loc"][:-1] else str(key)
        return f"{where}: unknown key '{key}' in {parent} — {_runtime_hint(err['loc'], key)}"
    if kind == "union_tag_invalid":
        expected = [e.strip(" '") for e in err["ctx"]["expected_tags"].split(",")]
        tag, key = err["ctx"]["tag"], err["ctx"]["discriminator"].strip("'")
        return f"{where}.{key}: unknown {key} '{tag}'{_suggest(tag, expected)} (allowed: {', '.join(expected)})"
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", err["ctx"]["expected"])
        return f"{where}: {value!r} is not allowed{_suggest(value, expected)} (allowed: {', '.join(expected)})"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        field = re.match(r"^([a-z_]+): ", msg)  # a model-level check names its field first
        if field:
            return f"{where}.{field.group(1)}: {msg[field.end():]}"
        return f"{where}: {msg}"
    return f"{where}: {msg} (got {_shown(value)})"


def _shown(value) -> str:
    """A bad value as the message quotes it: short, and whatever it holds (an alias containing itself)."""
    if isinstance(value, dict):
        return "{...}"
    try:
        return json.dumps(value, default=str)[:120]
    except (ValueError, RecursionError):
        return f"a {type(value).__name__} that contains itself"
