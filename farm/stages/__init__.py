"""Stage kinds: one module per kind of stage a sweep runs, in the order of the data flow. Each module defines

    code(params) -> list[str]     the farm modules whose code decides the stage's result (its code id)
    run(stage, deps, out) -> dict the stage's work, inline in tests or in a Ray task (no MLflow there)

and declares what the rest of the farm reads instead of naming the kind (defaults in farm/stages/common.py):

    SECTION, Config, OPTIONAL     the sweep file's section it reads (OPTIONAL: absent means the kind is off)
    METRICS                       what it measures (farm.plugin.Metric: name, direction, unit, label)
    PER, INPUTS, params()         a measurement: one stage per runtime setting ('runtime') or per runtime setting
                                  and target ('target') of each export, its inputs by role, its params
    EXCLUSIVE                     owns a whole node of the cell's target while it runs (a benchmark)
    AFTER, phase()                runs after every cell has its single-stream figures, on the cells it picks
    PATHS, reuse(), tags(), files()   result keys that are paths; when a stored result is reused; what the
                                  cell's MLflow run gets from it

Adding a measurement: one module here, one line below, one test.
"""

from farm.registry import Registry

STAGES = Registry("stage kind", {
    "base": "farm.stages.base",
    "reference": "farm.stages.reference",
    "compress": "farm.stages.compress",
    "export": "farm.stages.export",
    "evaluate": "farm.stages.evaluate",
    "bench": "farm.stages.bench",
    "roofline": "farm.stages.roofline",
    "tasks": "farm.stages.tasks",
    "serve": "farm.stages.serve",
}, base=None, key=None, needs=("code", "run"), plugin_kind="stage")

# The production chain every cell is made by, in order (a compress step per pipeline step): the grid builds it
# from these kinds; every other kind measures what it made (PER, INPUTS).
CHAIN = ("base", "reference", "compress", "export")
