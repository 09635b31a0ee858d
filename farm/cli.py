"""`farm validate | run | submit | status | pareto | promote | generate | serve | chat | loadtest | schema | labels |
nodes | sync`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from farm.errors import FarmError, SpecError


def cmd_validate(a) -> int:
    from farm.plan import grid
    from farm.sweep import spec

    sweep = spec.load(a.file)
    g = grid.build(sweep)
    print(f"{a.file}: valid — sweep '{sweep.name}', {len(g.cells)} cells, {len(g.stages)} stages")
    return 0


def cmd_run(a) -> int:
    from farm.run import driver

    return driver.run(a.file)


def ray_token_auth() -> None:
    """farm's clusters all use Ray's token authentication; Ray reads the mode when it is imported. A local
    head that clusters/local/up.sh started in Ray's one-machine mode listens on 127.0.0.1 only, and a Ray
    client outside that mode would rewrite 127.0.0.1 into this machine's address: join its mode."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from farm import storage

    homes = [storage.home()]
    if "FARM_HOME" not in os.environ:  # typed in a checkout: `make up` keeps the cluster's state in its .farm/
        homes.append(Path(".farm"))
    if any((m := h / "run" / "ray-mode").is_file() and m.read_text().strip() == "loopback" for h in homes):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def cmd_submit(a) -> int:
    ray_token_auth()
    from farm.run.jobs import submit_job

    return submit_job(a.file, a.address, wait=not a.no_wait)


def cmd_status(a) -> int:
    from farm.decide.status import status_report

    print(status_report(a.name))
    return 0


def cmd_pareto(a) -> int:
    from farm.decide.report import pareto_report

    r = pareto_report(a.name, a.sweep_run)
    print(r["table"])
    best = r["best"]
    print(f"\npromote policy ({r['spec']['promote']['metric']}) picks: "
          f"{best['label'] + ' (run ' + best['id'] + ')' if best else 'nothing (empty front)'}")
    return 0


def cmd_report(a) -> int:
    from farm.decide.report import build

    out = Path(a.out or f"reports/{a.name}")
    r = build(a.name, out, a.sweep_run)
    failed = [k for k in r["checks"] if not k["ok"]]
    print(f"farm: report of {a.name} (parent run {r['parent']}): {r['html']} and {r['md']}, "
          f"{len(r['figures'])} figures, {len(r['checks'])} ordering checks ({len(failed)} failed); "
          "also logged to the parent run's artifacts")
    for k in failed:
        print(f"  ordering check FAILED: {k['check']} — {k['cells']}: {k['detail']}")
    return 0


def cmd_promote(a) -> int:
    from farm.decide.promote import promote

    r = promote(a.name, a.run, a.model_name, a.alias, a.sweep_run)
    print(r["table"] + "\n")
    what = "already is" if r["unchanged"] else "promoted:"
    print(f"{r['model_name']}@{r['alias']} {what} {r['label']} (run {r['run_id']}), version {r['version']}; "
          f"`farm serve {r['uri']}` serves it, `farm generate {r['uri']} PROMPT` runs it (each checks its files first; a bare "
          f"mlflow.pyfunc.load_model does not) (tracking server {r['tracking_uri']})")
    return 0


def cmd_generate(a) -> int:
    from farm.decide.promote import generate

    for text in generate(a.uri, a.prompt, a.max_tokens):
        print(text)
    return 0


def cmd_serve(a) -> int:
    """A registered model behind its serving engine (llama-server for GGUF, OpenVINO GenAI continuous batching
    for OpenVINO IR) with an OpenAI-compatible API on 127.0.0.1 (another --host: behind an API key); with
    --mlflow, MLflow's own scoring server (POST /invocations with {"inputs": ["a prompt", ...], "params":
    {"max_tokens": 32}}), for any format, on loopback only."""
    from farm.decide import deploy

    if a.mlflow and a.lora:
        raise FarmError("--lora: adapters are served by llama-server (farm serve without --mlflow); MLflow's "
                        "scoring server serves the promoted model alone")
    if a.mlflow:
        return deploy.serve_mlflow(a.uri, a.host, a.port or 5001)
    return deploy.serve(a.uri, a.host, a.port or 8000, a.parallel, a.n_ctx, a.threads, a.lora,
                        api_key=a.api_key or os.environ.get("FARM_API_KEY"))


def cmd_chat(a) -> int:
    from farm.decide.deploy import chat

    return chat(a.uri if not a.uri.startswith("http") else None, a.uri if a.uri.startswith("http") else None,
                a.system, a.max_tokens, api_key=a.api_key or os.environ.get("FARM_API_KEY"))


def cmd_loadtest(a) -> int:
    from farm.decide.deploy import loadtest
    from farm.serve import bench as servebench

    levels = [int(x) for x in a.concurrency.split(",")]
    r = loadtest(a.url, a.model, levels, a.requests, a.prompt_tokens, a.output_tokens, a.shared_prefix_tokens,
                 a.registered, a.experiment, api_key=a.api_key or os.environ.get("FARM_API_KEY"))
    print(servebench.table(r["result"]))
    print(f"\nlogged to MLflow ({r['tracking_uri']}): experiment '{r['experiment']}', run {r['run_id']}")
    return 0


def cmd_schema(a) -> int:
    from farm.sweep.spec import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if a.output:
        from pathlib import Path

        from farm.storage import atomic_write_text

        atomic_write_text(Path(a.output), text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_labels(a) -> int:
    from farm.nodes import labels_arg

    extra = dict(kv.split("=", 1) for kv in a.extra)
    print(labels_arg(extra))
    return 0


def cmd_nodes(a) -> int:
    ray_token_auth()
    from farm.run.cluster import describe_nodes

    print(describe_nodes(a.address or os.environ.get("RAY_ADDRESS", "auto")))
    return 0


def cmd_sync(a) -> int:
    from farm.record.outbox import parked, sync

    left = sync()
    print("farm: every queued MLflow record delivered" if not left else f"farm: {left} record(s) still queued")
    refused = parked()
    for f, why in refused:
        print(f"farm: parked (MLflow refused it for good): {f}: {why}")
    return 1 if left or refused else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="farm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("validate", help="check a sweep file without running anything")
    s.add_argument("file")
    s.set_defaults(fn=cmd_validate)
    s = sub.add_parser("run", help="run a sweep (what `ray job submit` runs on the cluster)")
    s.add_argument("file")
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("submit", help="submit a sweep to the Ray cluster as a job and follow its log")
    s.add_argument("file")
    s.add_argument("--address", help="the cluster's dashboard (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    s.add_argument("--no-wait", action="store_true", help="return once submitted")
    s.set_defaults(fn=cmd_submit)
    s = sub.add_parser("status", help="a sweep's state and cells, from MLflow (no NAME: every sweep)")
    s.add_argument("name", nargs="?")
    s.set_defaults(fn=cmd_status)
    for name, fn, text in (("pareto", cmd_pareto, "print and record the Pareto front of a sweep"),
                           ("promote", cmd_promote, "register the chosen cell's model and set an alias")):
        s = sub.add_parser(name, help=text)
        s.add_argument("name", help="the sweep name (= MLflow experiment)")
        s.add_argument("--sweep-run", help="the sweep's parent run id (default: the latest submission)")
        if name == "promote":
            s.add_argument("--run", help="the cell run to promote (default: the promote policy's pick)")
            s.add_argument("--model-name", help="registered model name (default: promote.model_name or the sweep)")
            s.add_argument("--alias", help="alias to set (default: promote.alias, 'champion')")
        s.set_defaults(fn=fn)
    s = sub.add_parser("report", help="write a sweep's report (HTML + Markdown, with its plots) and log it to "
                       "the sweep's parent run")
    s.add_argument("name", help="the sweep name (= MLflow experiment)")
    s.add_argument("--sweep-run", help="the sweep's parent run id (default: the latest submission)")
    s.add_argument("-o", "--out", help="directory to write into (default: reports/NAME)")
    s.set_defaults(fn=cmd_report)
    s = sub.add_parser("generate", help="generate text with a registered model, e.g. models:/demo@champion")
    s.add_argument("uri")
    s.add_argument("prompt", nargs="+")
    s.add_argument("--max-tokens", type=int, default=48)
    s.set_defaults(fn=cmd_generate)
    s = sub.add_parser("serve", help="serve a registered model with an OpenAI-compatible API, e.g. "
                       "models:/demo@champion")
    s.add_argument("uri")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, help="default 8000 (--mlflow: 5001)")
    s.add_argument("--parallel", type=int, default=4, help="concurrent sequences the engine batches (slots)")
    s.add_argument("--n-ctx", type=int, help="KV-cache tokens shared by the slots (default 4096 per slot)")
    s.add_argument("--threads", type=int, help="engine threads (default: those its benchmark used)")
    s.add_argument("--lora", action="append", default=[], metavar="ADAPTER",
                   help="a LoRA adapter to load beside the model: a GGUF file, runs:/RUN_ID (the adapter the sft step "
                   "of that cell logged) or models:/NAME@ALIAS (that of the cell promoted as it); repeat for several "
                   "(per-user assistants on one base); a request picks one with \"lora\": [{\"id\": N, "
                   "\"scale\": 1.0}] in its body")
    s.add_argument("--mlflow", action="store_true", help="MLflow's pyfunc scoring server instead (/invocations; "
                   "127.0.0.1 only: it checks no key)")
    s.add_argument("--api-key", metavar="KEY", help="clients must send `Authorization: Bearer KEY` (default "
                   "$FARM_API_KEY; on a --host other than loopback, a new key is made and printed if none is given)")
    s.set_defaults(fn=cmd_serve)
    s = sub.add_parser("chat", help="chat in the terminal with a registered model (models:/NAME@ALIAS, started "
                       "here) or a running OpenAI-compatible endpoint (http://127.0.0.1:8000)")
    s.add_argument("uri")
    s.add_argument("--system", help="a system message")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--api-key", metavar="KEY", help="the endpoint's API key (default $FARM_API_KEY)")
    s.set_defaults(fn=cmd_chat)
    s = sub.add_parser("loadtest", help="the serve benchmark's load against an OpenAI-compatible endpoint, "
                       "logged to MLflow")
    s.add_argument("url", help="e.g. http://127.0.0.1:8000 (what `farm serve` prints)")
    s.add_argument("--model", help="the model name to send (default: the endpoint's first /v1/models entry)")
    s.add_argument("--concurrency", default="1,2,4", help="levels, comma-separated")
    s.add_argument("--requests", type=int, help="requests per level (default max(4, 2 x concurrency))")
    s.add_argument("--prompt-tokens", type=int, default=128)
    s.add_argument("--output-tokens", type=int, default=32)
    s.add_argument("--shared-prefix-tokens", type=int, default=96, help="0: no shared-prefix pass")
    s.add_argument("--registered", help="log against this model version: models:/NAME@ALIAS or models:/NAME/V")
    s.add_argument("--experiment", default="loadtest", help="MLflow experiment (default 'loadtest')")
    s.add_argument("--api-key", metavar="KEY", help="the endpoint's API key (default $FARM_API_KEY)")
    s.set_defaults(fn=cmd_loadtest)
    s = sub.add_parser("schema", help="JSON schema of sweep files, for editors")
    s.add_argument("-o", "--output")
    s.set_defaults(fn=cmd_schema)
    s = sub.add_parser("labels", help="this machine's CPU labels, as `ray start --labels` takes them")
    s.add_argument("extra", nargs="*", help="more labels, key=value")
    s.set_defaults(fn=cmd_labels)
    s = sub.add_parser("nodes", help="labels and resources of every node of the Ray cluster")
    s.add_argument("--address")
    s.set_defaults(fn=cmd_nodes)
    s = sub.add_parser("sync", help="deliver MLflow records queued while the server was unreachable")
    s.set_defaults(fn=cmd_sync)
    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except SpecError as e:
        print(f"farm: invalid sweep — {e}", file=sys.stderr)
        return 2
    except FarmError as e:
        print(f"farm: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if not unreachable(e):
            raise
        uri = os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
        print(f"farm: MLflow at {uri} is unreachable ({type(e).__name__}); start the local farm with `make up`, or "
              "point MLFLOW_TRACKING_URI at your tracking server", file=sys.stderr)
        return 1


def unreachable(e: BaseException) -> bool:
    """An error that only says the MLflow server could not be reached (the client wraps urllib3's)."""
    import requests

    text = str(e)
    return isinstance(e, requests.exceptions.ConnectionError) or (
        type(e).__name__ == "MlflowException" and ("Failed to establish a new connection" in text
                                                   or "Max retries exceeded" in text))


if __name__ == "__main__":
    sys.exit(main())
