"""The workflow against a real S3-compatible server: a bucket holding the tiny dataset, a
working directory that reads it from S3 and publishes to it, and checks of what was
published (used by the storage, working-file, publishing and hostile-input tests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from s3_support import (
    FaultProxy,
    MotoServer,
    fake_credentials,
    isolated_aws_environment,
    new_bucket_name,
    raw_client,
)
from workflow_support import run_snakemake, write_config, write_samples

CT = ("phantom-chest-01", "ct", "ct/phantom-chest-01")


WSI = ("synthetic-01", "wsi", "wsi/synthetic-01.tiff")


NEW_CT = ("real-dcmqi-3slice", "ct", "ct/real-dcmqi-3slice")


def chain(sample: str, modality: str) -> set[tuple[str, str]]:
    return {
        (rule, sample)
        for rule in ("download", f"preprocess_{modality}", f"tile_{modality}", "upload")
    }


@pytest.fixture(scope="module")
def aws_env(tmp_path_factory) -> dict[str, str]:
    """What the snakemake processes get: fake credentials and no other AWS configuration."""
    return isolated_aws_environment(tmp_path_factory.mktemp("aws"), fake_credentials())


class World:
    """A bucket holding the tiny dataset, and a working directory that reads it from S3."""

    def __init__(self, server: MotoServer, env: dict[str, str], data: Path, workdir: Path):
        self.server, self.env, self.data, self.workdir = server, env, data, workdir
        # The workflow always talks to a proxy on one port, so that the endpoint in the
        # config stays the same when the proxy is swapped for a faulty or slow one.
        self.proxy = FaultProxy(server.url)
        self.endpoint = self.proxy.url
        self.bucket = new_bucket_name()
        self.s3 = raw_client(server.url, env)
        self.s3.create_bucket(Bucket=self.bucket)
        self.outputs: list[str] = []  # everything snakemake printed, for the secrets check

    def upload(self, relative: str) -> None:
        """Put ``data/<relative>`` (a file or a folder) under ``<relative>`` in the bucket."""
        source = self.data / relative
        paths = (
            [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        )
        for path in paths:
            key = (
                relative
                if source.is_file()
                else f"{relative}/{path.relative_to(source).as_posix()}"
            )
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=path.read_bytes())

    def uri(self, relative: str) -> str:
        source = self.data / relative
        return f"s3://{self.bucket}/{relative}" + ("" if source.is_file() else "/")

    def configure(self, samples) -> None:
        write_samples(
            self.workdir, [(name, modality, self.uri(rel)) for name, modality, rel in samples]
        )
        write_config(
            self.workdir,
            destination=f"s3://{self.bucket}/published",
            storage={"endpoint_url": self.endpoint, "region": "us-east-1"},
            # these tests compare the working files with the source and the published
            # copy; their removal after upload is tested in test_scratch.py
            keep_working_files=True,
        )

    def swap_proxy(self, **behaviour) -> FaultProxy:
        """Replace the proxy by one with ``behaviour`` (faults, latency) on the same port."""
        self.proxy.stop()
        self.proxy = FaultProxy(self.server.url, port=self.proxy.port, **behaviour)
        return self.proxy

    def run(self, *args: str, check: bool = True):
        run = run_snakemake(self.workdir, *args, env=self.env, check=check)
        self.outputs.append(run.stdout + run.stderr)
        return run

    def objects(self, prefix: str = "published/") -> dict[str, bytes]:
        """key -> bytes of every object under ``prefix``."""
        found = {}
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            for entry in page.get("Contents", []):
                body = self.s3.get_object(Bucket=self.bucket, Key=entry["Key"])["Body"].read()
                found[entry["Key"]] = body
        return found

    def published(self) -> dict[str, dict[str, str]]:
        """sample folder -> {name: sha256 of the object's bytes} of what each sample's
        manifest.json lists (read at its path), and of manifest.json itself."""
        found: dict[str, dict[str, str]] = {}
        objects = self.objects()
        for key, body in objects.items():
            parts = key.split("/")
            if parts[1] == "dataset" or parts[3:] != ["manifest.json"]:
                continue  # the dataset index: see assert_published_complete
            folder = "/".join(parts[1:3])
            manifest = json.loads(body)
            files = found.setdefault(folder, {"manifest.json": hashlib.sha256(body).hexdigest()})
            for entry in manifest["files"]:
                data = objects.get(f"published/{folder}/{entry.get('path', entry['name'])}")
                if data is not None:
                    files[entry["name"]] = hashlib.sha256(data).hexdigest()
        return found


@pytest.fixture
def world(moto_server, aws_env, tiny_data, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    world = World(moto_server, aws_env, tiny_data, workdir)
    yield world
    world.proxy.stop()


def assert_published_complete(world: World, samples) -> None:
    """Every sample: manifest.json lists exactly the objects of the version folder it
    points at, with their SHA-256, and nothing else is under the sample's prefix."""
    objects = world.objects()
    for name, modality, _ in samples:
        folder = f"published/{modality}/{name}/"
        manifest = json.loads(objects[folder + "manifest.json"])
        assert manifest["sample"] == name
        listed = {folder + f["path"]: f["sha256"] for f in manifest["files"]}
        assert all(f["path"] == f"{manifest['version']}/{f['name']}" for f in manifest["files"])
        held = {
            key: hashlib.sha256(body).hexdigest()
            for key, body in objects.items()
            if key.startswith(folder) and key != folder + "manifest.json"
        }
        assert held == listed
    # the dataset index of the destination, manifest.json last, listing the tables
    index = json.loads(objects["published/dataset/samples/manifest.json"])
    assert index["counts"]["samples"] == len(samples)
    for entry in index["files"]:
        data = objects[f"published/dataset/samples/{entry['path']}"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]


def assert_no_credentials_anywhere(world: World) -> None:
    secrets = [world.env["AWS_ACCESS_KEY_ID"], world.env["AWS_SECRET_ACCESS_KEY"]]
    texts = list(world.outputs)
    for path in world.workdir.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            texts.append(path.read_bytes().decode("utf-8", errors="replace"))
    for sample_objects in world.published().values():
        texts.append(json.dumps(sample_objects))
    for page in world.s3.get_paginator("list_objects_v2").paginate(
        Bucket=world.bucket, Prefix="published/"
    ):
        for entry in page.get("Contents", []):
            if entry["Key"].endswith(".json"):
                texts.append(
                    world.s3.get_object(Bucket=world.bucket, Key=entry["Key"])["Body"]
                    .read()
                    .decode()
                )
    assert len(texts) > 10
    for secret in secrets:
        assert not [t for t in texts if secret in t]
