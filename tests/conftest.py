"""Shared fixtures: a tiny dataset built by the demo builder (real DICOM and real slides)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from s3_workflow_support import aws_env, world  # noqa: F401 - fixtures of the S3 workflow tests
from workflow_support import write_config, write_samples

# The demo dataset, small: a 96 x 96 x 40 chest phantom at 4 mm / 5 mm, a 1536 px
# synthetic slide, plus the real CT series and the real slide from tests/fixtures.
TINY_SAMPLES = [
    ("phantom-chest-01", "ct", "data/ct/phantom-chest-01"),
    ("real-dcmqi-3slice", "ct", "data/ct/real-dcmqi-3slice"),
    ("synthetic-01", "wsi", "data/wsi/synthetic-01.tiff"),
    ("CMU-1-Small-Region", "wsi", "data/wsi/CMU-1-Small-Region.svs"),
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from medprep import demo

    folder = tmp_path_factory.mktemp("tiny") / "data"
    demo.build(folder, phantom_shape=(96, 96, 40), phantom_spacing_mm=(4.0, 5.0), slide_size=1536)
    return folder


@pytest.fixture
def workdir(tmp_path, tiny_data) -> Path:
    """A fresh working directory with the tiny dataset, its sample sheet and a fast config."""
    shutil.copytree(tiny_data, tmp_path / "data")
    write_samples(tmp_path, TINY_SAMPLES)
    write_config(tmp_path)
    return tmp_path


# ---- the S3 server of the tests: a real moto_server process per test module


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory):
    from s3_support import MotoServer

    with MotoServer(tmp_path_factory.mktemp("moto") / "moto_server.log") as server:
        yield server


@pytest.fixture
def s3_env(tmp_path, monkeypatch):
    """The fake credentials in the environment for this test."""
    from s3_support import use_test_credentials

    from medprep import storage

    yield use_test_credentials(tmp_path, monkeypatch)
    storage.clear_caches()


@pytest.fixture
def bucket(moto_server, s3_env):
    """A new empty bucket on the test server."""
    from s3_support import create_bucket

    return create_bucket(moto_server, s3_env)


@pytest.fixture
def s3(moto_server, s3_env):
    """A plain boto3 client of the test server."""
    from s3_support import raw_client

    return raw_client(moto_server.url, s3_env)
