"""Generated bad sweeps: every malformed variant of a valid sweep is rejected before any task runs,
with the offending field named."""

import copy
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farm.compress import METHODS
from farm.errors import SpecError
from farm.export import FORMATS
from farm.sweep import spec

DEMO = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml").read_text())

# (path into the sweep, bad values that must be refused there)
INT_FIELDS = [("data", "calib_tokens"), ("data", "eval_windows"), ("data", "eval_window_tokens"),
              ("bench", "prompt_tokens"), ("bench", "decode_tokens"), ("bench", "repeats"), ("bench", "warmup")]
SECTIONS = ["base", "data", "bench", "promote"]
wrong_types = st.one_of(st.text(min_size=1, max_size=8).filter(lambda s: not s.strip().lstrip("-").isdigit()),
                        st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                              max_size=1), st.none())
key_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)


def rejected(d) -> list[str]:
    try:
        spec.parse(d)
    except SpecError as e:
        return e.problems
    raise AssertionError(f"accepted a malformed sweep: {d}")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(section=st.sampled_from(SECTIONS), key=key_names)
def test_unknown_keys(section, key):
    d = copy.deepcopy(DEMO)
    d.setdefault(section, {})
    if key in spec.sweep_model().model_fields[section].annotation.model_fields:
        return
    d[section][key] = 1
    assert any(p.startswith(f"{section}.{key}:") and "unknown key" in p for p in rejected(d))


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(INT_FIELDS), value=st.one_of(wrong_types, st.integers(max_value=-1),
                                                          st.integers(min_value=10**7)))
def test_wrong_types_and_out_of_range(field, value):
    d = copy.deepcopy(DEMO)
    section, key = field
    d.setdefault(section, {})[key] = value
    assert any(p.startswith(f"{section}.{key}:") for p in rejected(d))


@settings(max_examples=40, deadline=None)
@given(method=key_names.filter(lambda m: m not in METHODS))
def test_unknown_methods(method):
    d = copy.deepcopy(DEMO)
    d["pipelines"] = [[{"method": method}]]
    assert any(p.startswith("pipelines[0][0].method:") and "unknown method" in p for p in rejected(d))


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(FORMATS.names()), quant=st.text(min_size=1, max_size=6))
def test_levels_a_format_lacks(fmt, quant):
    if quant in FORMATS.options(fmt).LEVELS:
        return
    d = copy.deepcopy(DEMO)
    d["exports"] = [{"format": fmt, "quant": [quant]}]
    assert any(p.startswith("exports[0].quant:") for p in rejected(d))


@settings(max_examples=30, deadline=None)
@given(drop=st.integers(min_value=30, max_value=500), empty=st.sampled_from(["exports", "targets", "pipelines",
                                                                           "objectives"]))
def test_empty_grids_and_impossible_pipelines(drop, empty):
    d = copy.deepcopy(DEMO)
    d["pipelines"] = [[{"method": "prune_layers", "drop": drop}]]
    d[empty] = [] if empty != "objectives" else {}
    problems = rejected(d)
    assert any(p.startswith(f"{empty}:") for p in problems)  # the empty grid axis is named
    if empty != "pipelines":  # and the pipeline that would drop every block, when it is still there
        assert any(p.startswith("pipelines[0][0].drop:") for p in problems)


def test_every_generator_reaches_the_parser(monkeypatch):
    """Each property test above, run again here (so in any order, or alone), sends most of its generated
    sweeps through `rejected`: its early return for a generated key or level that happens to be valid
    does not leave it vacuous."""
    tests = [test_unknown_keys, test_wrong_types_and_out_of_range, test_unknown_methods, test_levels_a_format_lacks,
             test_empty_grids_and_impossible_pipelines]
    tried: dict[str, int] = {}
    for test in tests:
        def counted(d, name=test.__name__, real=rejected):
            tried[name] = tried.get(name, 0) + 1
            return real(d)

        monkeypatch.setitem(globals(), "rejected", counted)
        test()
        monkeypatch.undo()
    assert all(tried.get(t.__name__, 0) >= 20 for t in tests), tried  # of 30 to 60 examples each
    print(f"\n{sum(tried.values())} generated bad sweeps tried, all rejected with the field named: {tried}")


DEMO_TEXT = (Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml").read_text()
TRIED = {"mutated": 0, "generated": 0}


def named_or_valid(text: str) -> None:
    """The parser's whole contract with hostile text: a valid sweep, or SpecError naming what is wrong — never
    another exception (a traceback) and never a hang (an alarm after 20 s fails the example)."""
    import signal

    def hang(*_):
        raise AssertionError("the parser took over 20 s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    try:
        spec.loads(text, "fuzz.yaml")
    except SpecError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


edits = st.lists(st.tuples(st.sampled_from(["delete", "insert", "duplicate", "swap"]), st.integers(0, 10**6),
                           st.integers(1, 40), st.text(max_size=12)), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=edits)
def test_mutated_sweep_files_get_a_named_error_never_a_traceback(edits):
    text = DEMO_TEXT
    for op, at, n, s in edits:
        at %= max(len(text), 1)
        if op == "delete":
            text = text[:at] + text[at + n:]
        elif op == "insert":
            text = text[:at] + s + text[at:]
        elif op == "duplicate":
            text = text[:at] + text[at:at + n] + text[at:]
        else:
            lines = text.splitlines(keepends=True)
            i, j = at % len(lines), (at + n) % len(lines)
            lines[i], lines[j] = lines[j], lines[i]
            text = "".join(lines)
    TRIED["mutated"] += 1
    named_or_valid(text)


yaml_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                                     st.text(max_size=10)),
                           lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                           max_leaves=30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.one_of(yaml_values, st.dictionaries(st.sampled_from(list(DEMO) + ["x"]), yaml_values, max_size=6)))
def test_generated_documents_get_a_named_error_never_a_traceback(doc):
    TRIED["generated"] += 1
    named_or_valid(yaml.safe_dump(doc))


def test_pathological_yaml_gets_a_named_error():
    laughs = "".join(f"{c}: &{c} [{', '.join([f'*{p}' if p else repr('x')] * 9)}]\n"
                     for p, c in zip([None, *"abcdefg"], "abcdefgh"))
    for text in (laughs + "name: x\nexports: *h\n", "[" * 5000 + "]" * 5000, "{a: " * 3000 + "1" + "}" * 3000,
                 "name: " + "x" * 1_000_000, "\x00\xff binary", "- - - -\n" * 100, "name: &a [*a]\n"):
        named_or_valid(text)
