"""`farm submit FILE`: the sweep validated here, then run as a Ray job on the cluster, its log followed."""

from __future__ import annotations

import os

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
    client = JobSubmissionClient(address)
    job = client.submit_job(entrypoint=f"python -m farm run {path}",
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
