"""A MetaImage volume on S3 is one sample input: the .mhd object brings its .raw, in
download, fingerprints and discovery (LUNA16 keeps x.mhd and x.raw side by side)."""

from __future__ import annotations

import pytest

from medprep import storage


@pytest.fixture
def settings(moto_server):
    return {"endpoint_url": moto_server.url, "region": "us-east-1", "max_attempts": 3}


def put_luna_like(s3, bucket):
    for key, body in {
        "luna/subset0/1.3.6.1.mhd": b"ObjectType = Image\nElementDataFile = 1.3.6.1.raw\n",
        "luna/subset0/1.3.6.1.raw": b"\x00" * 64,
        "luna/subset0/1.3.6.12.mhd": b"ObjectType = Image\nElementDataFile = 1.3.6.12.raw\n",
        "luna/subset0/1.3.6.12.raw": b"\x01" * 32,
        "luna/subset0/case.nii.gz": b"nifti bytes",
        "luna/subset0/notes.txt": b"not a sample",
    }.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)


def test_a_mhd_object_downloads_with_its_data_file_only(s3, bucket, settings, tmp_path):
    put_luna_like(s3, bucket)
    uri = f"s3://{bucket}/luna/subset0/1.3.6.1.mhd"
    files = storage.fetch(uri, tmp_path / "download", settings=settings)
    assert sorted(f.key for f in files) == ["1.3.6.1.mhd", "1.3.6.1.raw"]
    assert (tmp_path / "download" / "1.3.6.1.raw").read_bytes() == b"\x00" * 64
    assert storage.source_fingerprint(uri, settings) == storage.files_fingerprint(files)


def test_discovery_takes_each_volume_object_as_one_sample(s3, bucket, settings):
    put_luna_like(s3, bucket)
    found = storage.discover(f"s3://{bucket}/luna/subset0/", "ct", settings)
    assert [(s["sample"], s["uri"].rsplit("/", 1)[-1]) for s in found] == [
        ("1.3.6.1", "1.3.6.1.mhd"),
        ("1.3.6.12", "1.3.6.12.mhd"),
        ("case", "case.nii.gz"),
    ]
    storage.clear_caches()
    for sample in found:
        assert sample["fingerprint"] == storage.source_fingerprint(sample["uri"], settings)
