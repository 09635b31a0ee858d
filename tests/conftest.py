"""Shared fixtures. Stage outputs go to a per-session temporary storage. Unit tests use the tiny model
(tests/tiny_model.py); only tests marked integration or e2e use the embedded model (`embedded_dir`), whose
one-time float conversion is cached under FARM_HOME (./.farm by default), like any other model cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FARM_HOME", str(ROOT / ".farm"))
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


@pytest.fixture(scope="session")
def storage_root(tmp_path_factory):
    path = tmp_path_factory.mktemp("storage")
    old = os.environ.get("FARM_STORAGE")
    os.environ["FARM_STORAGE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FARM_STORAGE", None)
    else:
        os.environ["FARM_STORAGE"] = old


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from farm.inputs.models import convert_embedded

    return convert_embedded("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a small tokenizer trained in-process (tests/tiny_model.py): no embedded model."""
    from tiny_model import build

    return build(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def trained_tiny_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model trained briefly on the calibration text: a teacher with something to teach."""
    from tiny_model import train

    return train(tiny_model_dir, tmp_path_factory.mktemp("tiny-trained"))


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1; returns a function that makes a bucket and gives fsspec options."""
    import logging
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"

    def bucket(name: str) -> dict:
        boto3.client("s3", endpoint_url=url, aws_access_key_id="farm-test", aws_secret_access_key="farm-test",
                     region_name="us-east-1").create_bucket(Bucket=name)
        return {"endpoint_url": url, "key": "farm-test", "secret": "farm-test",
                "client_kwargs": {"region_name": "us-east-1"}}

    yield bucket
    server.stop()
