"""A registered model behind its serving engine: `farm serve`, `farm chat`, `farm loadtest`.

`farm serve models:/demo@champion` downloads the registered version, checks its artifact against the
checksum recorded when it was measured, and starts the engine of the runtime it was measured with (its
options, its benchmark's threads) with an OpenAI-compatible API on 127.0.0.1. On a host other machines reach,
the API wants a key (`--api-key`, FARM_API_KEY, or one made up and printed). `farm chat` talks to it.
`farm loadtest URL` puts the serve benchmark's load on any OpenAI-compatible endpoint and logs it to MLflow.
`farm serve --mlflow` and `farm generate` load the pyfunc model (MLflow unpickles it) only once its files match
the checksum promote recorded (farm.model_sha256).
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from farm.errors import FarmError

MODEL_SHA256 = "farm.model_sha256"  # a registered version's tag: the checksum of its files, recorded by promote


def loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


def api_key_for(host: str, given: str | None) -> str | None:
    """The key the API will want: the one given; else, on a host other machines reach, a new one."""
    import secrets

    return given or (None if loopback(host) else secrets.token_urlsafe(32))


def resolve(uri: str, dest: Path) -> dict:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> {"artifact", "runtime", "threads", "name", "version"},
    the artifact downloaded into dest and checked against the version's farm.artifact_sha256."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file, dozens of files
    import mlflow

    from farm import storage

    name, version = _version(uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                     dst_path=str(dest)))
    paths = _artifacts(local)
    meta, artifact = json.loads(paths["meta"].read_text()), paths["model"]
    want = version.tags.get("farm.artifact_sha256", "")
    if not want or storage.sha256(artifact) != want:
        raise FarmError(f"{uri}: the downloaded artifact {artifact.name} does not match the checksum recorded when "
                        "it was measured (farm.artifact_sha256); not serving it")
    runtime = meta["runtime"]
    return {"artifact": artifact, "runtime": runtime, "threads": int(meta.get("threads", 2)), "name": name,
            "version": version.version, "run_id": version.run_id}


def _version(uri: str):
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (NAME, its MLflow model version)."""
    import mlflow

    from farm.record import outbox as tracking

    c = tracking.client()
    if not uri.startswith("models:/"):
        raise FarmError(f"'{uri}': give a registered model as models:/NAME@ALIAS or models:/NAME/VERSION")
    name, _, rest = uri[len("models:/"):].partition("@")
    try:
        if rest:
            return name, c.get_model_version_by_alias(name, rest)
        name, _, number = name.partition("/")
        return name, c.get_model_version(name, number)
    except Exception as e:  # noqa: BLE001 (MLflow's not-found and unreachable errors alike)
        raise FarmError(f"{uri}: no such registered model version on {mlflow.get_tracking_uri()} "
                        f"({str(e).splitlines()[0][:200]})") from None


def _download(model_uri: str, dest: Path) -> Path:
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest)))


def files_sha256(model_uri: str, dest: Path) -> str:
    """The checksum of a registered version's files (models:/NAME/VERSION) as verified_model downloads them."""
    from farm import storage

    return storage.sha256(_download(model_uri, dest))


def verified_model(uri: str, dest: Path) -> Path:
    """A registered version (models:/NAME@ALIAS or models:/NAME/VERSION) downloaded into dest, its files checked
    against the checksum promote recorded before anything of them is loaded (MLflow unpickles python_model.pkl)."""
    from farm import storage

    name, version = _version(uri)
    what = f"{uri} ({name} v{version.version})"
    want = version.tags.get(MODEL_SHA256)
    again = f"register it again with `farm promote` (which records {MODEL_SHA256})"
    if not want:
        raise FarmError(f"{what} records no checksum of its files ({MODEL_SHA256}), so they cannot be shown to be "
                        f"what was promoted; not loading them — {again}")
    local = _download(f"models:/{name}/{version.version}", dest)
    if storage.sha256(local) != want:
        raise FarmError(f"{what}: its files changed since it was promoted (they do not match {MODEL_SHA256}); not "
                        f"loading them — find out who wrote to the MLflow artifact store, then {again}")
    return local


def adapter(ref: str, dest: Path) -> Path:
    """A LoRA adapter GGUF for `--lora`: a local file; runs:/RUN_ID (the adapter an sft step of that cell logged);
    or models:/NAME@ALIAS (that of the cell the version was promoted from). Downloaded into dest and checked
    against the checksum the cell's run recorded (farm.adapter_sha256)."""
    import mlflow

    from farm import storage
    from farm.record import outbox as tracking

    if ":/" not in ref:  # a path, not runs:/ or models:/
        if not Path(ref).is_file():
            raise FarmError(f"--lora: no such adapter file {ref} (an sft step writes adapter/adapter-f16.gguf in "
                            "its stage and logs it to its cell's run: --lora runs:/RUN_ID or models:/NAME@ALIAS)")
        return Path(ref)
    if ref.startswith("models:/"):
        run_id = _version(ref)[1].run_id
    elif ref.startswith("runs:/"):
        run_id = ref[len("runs:/"):].strip("/").split("/")[0]
    else:
        raise FarmError(f"--lora {ref}: give an adapter file, runs:/RUN_ID or models:/NAME@ALIAS")
    try:
        tags = tracking.client().get_run(run_id).data.tags
    except Exception as e:  # noqa: BLE001 (not found, unreachable)
        raise FarmError(f"--lora {ref}: no run {run_id} on {mlflow.get_tracking_uri()} "
                        f"({str(e).splitlines()[0][:200]})") from None
    if "farm.adapter" not in tags:
        raise FarmError(f"--lora {ref}: run {run_id} ({tags.get('farm.label', '?')}) logged no adapter: only a "
                        "cell with an sft step has one")
    path = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=tags["farm.adapter"],
                                                    dst_path=str(dest)))
    if storage.sha256(path) != tags.get("farm.adapter_sha256"):
        raise FarmError(f"--lora {ref}: the downloaded adapter does not match the checksum its run recorded "
                        "(farm.adapter_sha256); not serving it")
    return path


def _artifacts(local: Path) -> dict[str, Path]:
    """The pyfunc model's artifacts by key (model: the exported file or directory; meta: how it was measured),
    as its MLmodel file lists them."""
    import yaml

    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    arts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if not {"model", "meta"} <= set(arts):
        raise FarmError(f"{local}: not a model promoted by farm (its MLmodel lists artifacts {sorted(arts)})")
    return {k: local / v["path"] for k, v in arts.items()}


def engine_server(model: dict, workdir: Path, host: str, port: int | None, parallel: int, n_ctx: int,
                  threads: int | None = None, lora: list[Path] = (), api_key: str | None = None):
    from farm.serve import ENGINES, engine

    runtime = dict(model["runtime"])
    if runtime["name"] not in ENGINES:
        raise FarmError(f"{model['name']} v{model['version']} runs on '{runtime['name']}', which has no serving "
                        f"engine (engines: {', '.join(ENGINES.names())}); `farm serve --mlflow` serves it through MLflow's "
                        "pyfunc scoring server instead")
    name = runtime.pop("name")
    eng = engine(name)
    extra = {}
    if lora:
        if not getattr(eng, "ADAPTERS", False):
            able = [n for n in ENGINES.names() if getattr(engine(n), "ADAPTERS", False)]
            raise FarmError(f"--lora: adapters are served unmerged by the {', '.join(able)} engine(s); "
                            f"{model['name']} v{model['version']} runs on '{name}'")
        extra = {"lora": [Path(p).resolve() for p in lora], "lora_applied": False}
    if api_key:
        extra["api_key"] = api_key
    return eng.server(model["artifact"], workdir, threads or model["threads"], parallel, n_ctx, host=host,
                      port=port, alias=model["name"], **runtime, **extra)


def _interrupt(signum, frame):  # `kill` or a service manager: stop the engine and clean up, as Ctrl-C does
    raise KeyboardInterrupt


def serve(uri: str, host: str, port: int, parallel: int, n_ctx: int | None, threads: int | None,
          lora: list[str] = (), api_key: str | None = None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _interrupt)
    key = api_key_for(host, api_key)
    with tempfile.TemporaryDirectory(prefix="farm-serve-") as d:
        model = resolve(uri, Path(d) / "model")
        adapters = [adapter(str(ref), Path(d) / f"adapter-{i}") for i, ref in enumerate(lora)]
        srv = engine_server(model, Path(d) / "engine", host, port, parallel, n_ctx or 4096 * parallel, threads,
                            adapters, api_key=key)
        with srv:
            print(f"farm: {model['name']} v{model['version']} ({model['runtime']['name']}) on {srv.url}/v1 "
                  f"(OpenAI API: /v1/completions, /v1/chat/completions, /v1/models; /health); {parallel} parallel "
                  f"slots; log {srv.log}; Ctrl-C stops it", flush=True)
            if key and not api_key:
                print(f"farm: {host} is reachable from other machines, so the API wants a key, made up for this run "
                      f"(choose one with --api-key or FARM_API_KEY); clients send\n\n    Authorization: Bearer {key}\n",
                      flush=True)
            elif key:
                print("farm: the API wants the key given (--api-key or FARM_API_KEY) as `Authorization: Bearer KEY`",
                      flush=True)
            for i, (ref, p) in enumerate(zip(lora, adapters)):
                print(f"farm: adapter {i}: {ref} ({p.name}) — off unless a request asks for it: "
                      f"\"lora\": [{{\"id\": {i}, \"scale\": 1.0}}]", flush=True)
            try:
                srv.proc.wait()
            except KeyboardInterrupt:
                print("\nfarm: stopping", flush=True)
                return 0
            srv.check_alive("serving")
    return 0


def serve_mlflow(uri: str, host: str, port: int) -> int:
    """MLflow's pyfunc scoring server for a registered version, given a local copy checked by verified_model."""
    import shutil
    import signal
    import subprocess

    if not loopback(host):
        raise FarmError(f"--mlflow --host {host}: MLflow's scoring server checks no API key, so it serves on this "
                        "machine only; serve on another host without --mlflow (the engine checks a key)")
    signal.signal(signal.SIGTERM, _interrupt)
    mlflow_bin = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    with tempfile.TemporaryDirectory(prefix="farm-serve-") as d:
        local = verified_model(uri, Path(d) / "model")
        cmd = [mlflow_bin, "models", "serve", "-m", str(local), "--env-manager", "local", "-h", host, "-p",
               str(port), "-w", "1"]  # (one string: MLflow's command, not the plug-in name test_house guards)
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)  # MLflow's CLI and the server it started
            proc.wait(30)
            return 0


def chat(uri: str | None, url: str | None, system: str | None, max_tokens: int, stdin=None, stdout=None,
         api_key: str | None = None) -> int:
    """A terminal chat (streaming, with history) against `url` (sending `api_key`, if any), or against `uri`
    started here on a free port of 127.0.0.1."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    with tempfile.TemporaryDirectory(prefix="farm-chat-") as d:
        srv = None
        if url is None:
            model = resolve(uri, Path(d) / "model")
            srv = engine_server(model, Path(d) / "engine", "127.0.0.1", None, 1, 4096)
            srv.start()
            url = srv.url
        try:
            return _chat_loop(url.rstrip("/"), system, max_tokens, stdin, stdout, api_key if srv is None else None)
        finally:
            if srv is not None:
                srv.stop()


def _chat_loop(url: str, system: str | None, max_tokens: int, stdin, stdout, api_key: str | None = None) -> int:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=api_key or "farm")  # an engine started without a key wants none
    model = client.models.list().data[0].id
    history = [{"role": "system", "content": system}] if system else []
    stdout.write(f"farm chat with {model} at {url} (empty line or Ctrl-D ends)\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line.strip():
            return 0
        history.append({"role": "user", "content": line.strip()})
        stdout.write(f"{model}> ")
        reply = []
        for event in client.chat.completions.create(model=model, messages=history, stream=True,
                                                    max_tokens=max_tokens, temperature=0):
            piece = event.choices[0].delta.content if event.choices else None
            if piece:
                reply.append(piece)
                stdout.write(piece)
                stdout.flush()
        stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def corpus_prompts(n: int, words: int, shared_words: int, offset: int) -> list[str]:
    """Prompts for an endpoint whose tokenizer farm does not have: runs of words of the embedded corpus
    (~0.75 words per token); the endpoint's usage says how many tokens they were."""
    from farm.inputs.data import split

    calib, evaluation = split([])
    text = (evaluation + "\n" + calib).split()
    unique = words - shared_words
    need = offset + shared_words + n * unique
    if need > len(text):
        raise FarmError(f"loadtest: {n} prompts of {words} words need {need} words of corpus; it has {len(text)}")
    prefix = text[offset:offset + shared_words]
    start = offset + shared_words
    return [" ".join(prefix + text[start + i * unique:start + (i + 1) * unique]) for i in range(n)]


def loadtest(url: str, model: str | None, levels: list[int], requests: int | None, prompt_tokens: int,
             output_tokens: int, shared_prefix_tokens: int, registered: str | None, experiment: str,
             api_key: str | None = None) -> dict:
    """The serve benchmark's load against any OpenAI-compatible endpoint (sending `api_key`, if any), logged to
    MLflow (against a registered model version when given as models:/NAME@ALIAS or models:/NAME/VERSION)."""
    import mlflow

    from farm.record import outbox as tracking
    from farm.serve import bench as servebench
    from farm.serve.common import get_text
    from farm.serve.loadgen import run_level

    url = url.rstrip("/")
    if not url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")) and \
            not os.environ.get("FARM_LOADTEST_REMOTE"):
        raise FarmError(f"loadtest: {url} is not on this machine; set FARM_LOADTEST_REMOTE=1 to load a remote "
                        "endpoint you are allowed to load")
    model = model or json.loads(get_text(f"{url}/v1/models", api_key=api_key))["data"][0]["id"]
    words = int(prompt_tokens * 0.75)
    shared_words = int(shared_prefix_tokens * 0.75)
    result = {"levels": {"distinct": []}, "engine": url, "threads": "?", "parallel": max(levels),
              "settings": {"endpoint": url, "model": model}}
    if shared_words:
        result["levels"]["shared_prefix"] = []
    offset = 0
    for name, shared in (("distinct", 0), ("shared_prefix", shared_words)):
        if name not in result["levels"]:
            continue
        for c in levels:
            n = requests or max(4, 2 * c)
            prompts = corpus_prompts(n, words, shared, offset)
            offset += shared + n * (words - shared)
            level = run_level(url, model, prompts, c, output_tokens, api_key=api_key)
            level.update({"engine_seqs_per_decode": float("nan"), "shared_prefix_tokens": shared_prefix_tokens
                          if shared else 0})
            result["levels"][name].append(level)
    c = tracking.client()
    tags = {"farm.kind": "loadtest", "farm.endpoint": url, "farm.model": model}
    version = None
    if registered:
        name, _, rest = registered[len("models:/"):].partition("@")
        version = c.get_model_version_by_alias(name, rest) if rest else c.get_model_version(*name.split("/", 1))
        tags.update({"farm.registered_model": version.name, "farm.model_version": str(version.version)})
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(experiment)
    run = c.create_run(exp_id, run_name=f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    now = int(time.time() * 1000)
    from mlflow.entities import Metric

    c.log_batch(run.info.run_id, metrics=[Metric(k, v, now, s) for k, v, s in servebench.mlflow_metrics(result)])
    with tempfile.TemporaryDirectory() as d:
        Path(d, "serve.json").write_text(json.dumps(result, indent=1, default=float))
        Path(d, "serve.txt").write_text(servebench.table(result))
        servebench.plot({model: result}, Path(d) / "serve.png")
        c.log_artifacts(run.info.run_id, d)
    c.set_terminated(run.info.run_id, "FINISHED")
    if version is not None:
        c.set_model_version_tag(version.name, version.version, "farm.loadtest_run", run.info.run_id)
    return {"result": result, "run_id": run.info.run_id, "experiment": experiment,
            "tracking_uri": mlflow.get_tracking_uri()}
