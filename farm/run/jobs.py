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

    try:
        follow(client, job)
    except KeyboardInterrupt:
        print(f"\nfarm: stopped following; the job goes on (`ray job stop {job}` stops it)", flush=True)
        return 130
    info = client.get_job_info(job)
    code = getattr(info, "driver_exit_code", None)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    return int(code) if code else 1


def follow(client, job: str, poll_s: float = 2.0, patience_s: float = 600.0) -> None:
    """Print the job's log until the job ends. The log stream (a websocket through the dashboard) may drop while
    the job goes on — a dashboard restart, a proxy's idle timeout: then the log is polled, printing only what
    was not printed yet, until the job is in a terminal state. A dashboard that stays unreachable for
    `patience_s` ends the wait with a message (the job's fate unknown here, `farm status` knows)."""
    import asyncio
    import time

    printed = 0

    async def tail():
        nonlocal printed
        async for lines in client.tail_job_logs(job):
            print(lines, end="", flush=True)
            printed += len(lines)

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 (a dropped stream; the job's state decides what follows)
        print(f"\nfarm: the job's log stream dropped ({type(e).__name__}: {str(e)[:200]}); following by polling",
              flush=True)
    last_contact = time.monotonic()
    while True:
        try:
            done = client.get_job_info(job).status.is_terminal()
            text = client.get_job_logs(job)
            last_contact = time.monotonic()
        except Exception as e:  # noqa: BLE001
            if time.monotonic() - last_contact > patience_s:
                raise StageError(f"the Ray dashboard stopped answering ({e}); job {job} may still run: "
                                 "`ray job status` / `farm status` tell") from None
            time.sleep(poll_s)
            continue
        if len(text) > printed:
            print(text[printed:], end="", flush=True)
            printed = len(text)
        if done:
            return
        time.sleep(poll_s)


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
