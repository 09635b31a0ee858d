"""The registries, the spec's unions built from them and each format's tables agree."""

from farm.compress import METHODS
from farm.export import FORMATS
from farm.plugin import RuntimeOptions, StepOptions
from farm.runtimes import RUNTIMES, runtimes_for
from farm.sweep import spec


def test_every_registered_plug_in_loads_and_names_itself():
    for registry in (METHODS, FORMATS, RUNTIMES):
        for name in registry.names():
            opts = registry.options(name)  # the registry checks base class, Literal name and functions
            assert opts.model_fields[registry.key].annotation.__args__ == (name,)
    assert all(issubclass(METHODS.options(n), StepOptions) for n in METHODS.names())
    assert all(issubclass(RUNTIMES.options(n), RuntimeOptions) for n in RUNTIMES.names())


def test_the_schema_unions_are_the_registries():
    schema = spec.json_schema()
    step = schema["properties"]["pipelines"]["items"]["items"]
    export = schema["properties"]["exports"]["items"]
    assert set(step["discriminator"]["mapping"]) == set(METHODS.names())
    assert set(export["discriminator"]["mapping"]) == set(FORMATS.names())


def test_each_format_declares_consistent_tables():
    for name in FORMATS.names():
        f = FORMATS.options(name)
        assert f.LEVELS and set(f.DIRECT) <= set(f.LEVELS), name
        if set(f.DIRECT) != set(f.LEVELS):  # the other levels are made from the base level's export
            assert f.BASE_LEVEL in f.DIRECT, name
        assert f.RUNTIME in runtimes_for(name), name
        assert set(getattr(f, "GROUPED", ())) <= set(f.LEVELS), name
        assert set(getattr(f, "DATA_AWARE", ())) <= set(getattr(f, "ALGORITHMS", ())), name
        for level in f.LEVELS:  # every level of every format expands into export variants
            assert f(format=name, quant=level).variants(), (name, level)


def test_every_runtime_loads_only_formats_that_exist():
    for name in RUNTIMES.names():
        assert set(RUNTIMES.options(name).FORMATS) <= set(FORMATS.names()), name
        assert RUNTIMES.options(name).TITLE, name
