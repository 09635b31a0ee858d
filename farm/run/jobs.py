"""`farm submit FILE`: the sweep validated here, then run as a Ray job on the cluster, its log followed."""

from __future__ import annotations

import os
import shlex
import tempfile

from farm import storage
from farm.errors import StageError
from farm.sweep import spec as specmod

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


def submit_job(path: str, address: str | None = None, wait: bool = True, working_dir: str = ".") -> int:
    """`farm submit FILE`: validate the sweep here, then submit `python -m farm run FILE` as a Ray job with
    the working directory and the farm's environment (FARM_*, MLFLOW_TRACKING_URI), follow its log, and
    return its exit status (0, or 3 for a partial sweep, see exit_code). What `ray job submit
    --address ... --working-dir . --runtime-env-json ... -- python -m farm run FILE` does by hand."""
    import asyncio

    from ray.job_submission import JobStatus, JobSubmissionClient

    specmod.load(path)  # a bad sweep fails here, before anything is uploaded
    token = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.path.isfile(token):
        raise StageError(f"no Ray cluster token in {token}: clusters/local/up.sh makes one for a local cluster; "
                         "for another cluster copy its token there, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH")
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    env = {k: v for k, v in os.environ.items() if k.startswith("FARM_") or k == "MLFLOW_TRACKING_URI"}
    # FARM_STORAGE_OPTIONS may hold the store's credentials, and a job's runtime_env is shown to anyone who can
    # reach the Ray dashboard (and its jobs API): it is not sent. The driver and the stage tasks need the options
    # only to reach a remote store (farm.storage._fs); each reads them from its node's environment (the raylet's,
    # set before `ray start`) or, failing that, from $FARM_HOME/storage-options.json, owner-only. They are kept
    # there for this machine's FARM_HOME, which a local cluster's nodes share; on other clusters put them on the
    # nodes (or give credentials the usual AWS way: instance profile, ~/.aws/credentials).
    options = env.pop("FARM_STORAGE_OPTIONS", None)
    if options is not None:
        print(f"farm: FARM_STORAGE_OPTIONS is not sent with the job; kept in {keep_options(options)} (mode 0600) "
              "for nodes that use this FARM_HOME", flush=True)
    client = JobSubmissionClient(address)
    job = client.submit_job(entrypoint=shlex.join(["python", "-m", "farm", "run", path]),
                            runtime_env={"working_dir": working_dir, "env_vars": env})
    print(f"farm: submitted {path} as Ray job {job} to {address}; `ray job logs {job}` shows its log, "
          f"`farm status` its cells", flush=True)
    if not wait:
        return 0

    async def follow():
        async for lines in client.tail_job_logs(job):
            print(lines, end="", flush=True)

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        print(f"\nfarm: stopped following; the job goes on (`ray job stop {job}` stops it)", flush=True)
        return 130
    info = client.get_job_info(job)
    code = getattr(info, "driver_exit_code", None)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    return int(code) if code else 1


def keep_options(raw: str):
    """Write storage options (JSON) to $FARM_HOME/storage-options.json, readable by this user only (mkstemp)."""
    import json

    json.loads(raw)  # a typo fails here, not on every node
    path = storage.home() / storage.OPTIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(raw)
    os.replace(tmp, path)
    return path
