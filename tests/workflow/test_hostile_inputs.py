"""Inputs made to hurt: files that refer to other files, headers that claim what they do
not hold. Each fails its own sample with one line naming the file and the cause, and
nothing outside a sample is ever read."""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medprep import storage
from medprep.common.errors import InputError
from medprep.ct import preprocess as pp
from medprep.ct import volume_io

SHAPE = (6, 10, 12)  # z, y, x
HEADER = (
    "ObjectType = Image\nNDims = 3\nDimSize = {x} {y} {z}\nElementType = MET_SHORT\n"
    "ElementSpacing = 1 1 2\nOffset = 0 0 0\nTransformMatrix = 1 0 0 0 1 0 0 0 1\n"
)


def voxels(seed: int = 0) -> np.ndarray:
    """An int16 volume in HU with air in it (so that its values pass as HU)."""
    rng = np.random.default_rng(seed)
    values = rng.integers(-1000, 400, size=SHAPE).astype(np.int16)
    values[:, :3] = -1000
    return values


def header_text(element_data_file: str, *, dims=None, extra: str = "") -> str:
    z, y, x = dims or SHAPE
    return HEADER.format(x=x, y=y, z=z) + extra + f"ElementDataFile = {element_data_file}\n"


def write_header(path: Path, element_data_file: str, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header_text(element_data_file, **kwargs))
    return path


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside every sample, exactly the size of a volume's voxels."""
    path = tmp_path / "elsewhere" / "secret.bin"
    path.parent.mkdir()
    path.write_bytes(b"AWS_SECRET_ACCESS_KEY=do-not-publish-me\n".ljust(voxels().nbytes, b"#"))
    return path


def read(paths) -> np.ndarray:
    files = [str(p) for p in paths]
    raw, _ = volume_io.read_volume(volume_io.volume_input(files), files)
    return raw.values


##### MetaImage data files stay inside the sample


@pytest.mark.parametrize(
    "reference",
    [
        "{secret}",  # an absolute path
        "../elsewhere/secret.bin",  # a path climbing out of the sample
        "LIST\n{secret}",  # a list naming an absolute path
        "LIST 2D\nslice0.raw\n../elsewhere/secret.bin",
        "../elsewhere/secret%d.bin 0 0 1",  # a numbered pattern climbing out
    ],
    ids=["absolute", "dotdot", "list-absolute", "list-dotdot", "pattern-dotdot"],
)
def test_a_metaimage_naming_a_file_outside_its_sample_is_refused(tmp_path, secret, reference):
    reference = reference.format(secret=secret)
    header = write_header(tmp_path / "sample" / "scan.mhd", reference)
    (tmp_path / "sample" / "slice0.raw").write_bytes(voxels()[0].tobytes())
    # a single .mhd as the sample's uri: download refuses it, naming the header
    with pytest.raises(InputError) as download:
        storage.fetch(str(header), tmp_path / "download", threads=1, settings={})
    assert download.value.path == str(header)
    assert "ElementDataFile" in download.value.cause
    # the folder as the sample's uri: preprocess refuses it, before SimpleITK reads a byte
    files = storage.fetch(str(header.parent), tmp_path / "download", threads=1, settings={})
    with pytest.raises(InputError) as preprocess:
        pp.load_series([f.path for f in files])
    assert preprocess.value.path.endswith("scan.mhd")
    assert "ElementDataFile" in preprocess.value.cause
    assert "other file(s)" not in preprocess.value.cause


def test_a_data_file_that_is_not_one_of_the_samples_files_is_refused(tmp_path):
    """An S3 sample brings its header and the data file of the same name only: a header
    naming another name (here: a file that a previous download left beside it) fails."""
    folder = tmp_path / "download"
    header = write_header(folder / "scan.mhd", "other.raw")
    (folder / "scan.raw").write_bytes(voxels().tobytes())
    (folder / "other.raw").write_bytes(voxels(1).tobytes())
    with pytest.raises(InputError, match="not one of the sample's files"):
        read([header, folder / "scan.raw"])


def test_every_legitimate_form_of_element_data_file_reads_the_same_voxels(tmp_path):
    values = voxels()
    forms = tmp_path / "forms"
    forms.mkdir()
    (forms / "one.raw").write_bytes(values.tobytes())
    for k, plane in enumerate(values):
        (forms / f"slice{k:02d}.raw").write_bytes(plane.tobytes())
    compressed = zlib.compress(values.tobytes())
    (forms / "one.zraw").write_bytes(compressed)
    local = header_text("LOCAL").encode() + values.tobytes()
    slices = [forms / f"slice{k:02d}.raw" for k in range(SHAPE[0])]
    cases = {
        "single": ("one.raw", "", [forms / "one.raw"]),
        "list": ("LIST 2D\n" + "\n".join(p.name for p in slices), "", slices),
        "pattern": (f"slice%02d.raw 0 {SHAPE[0] - 1} 1 2", "", slices),
        "zraw": (
            "one.zraw",
            f"CompressedData = True\nCompressedDataSize = {len(compressed)}\n",
            [forms / "one.zraw"],
        ),
    }
    for name, (reference, extra, data) in cases.items():
        header = write_header(forms / f"{name}.mhd", reference, extra=extra)
        np.testing.assert_array_equal(read([header, *data]), values, err_msg=name)
    (tmp_path / "local.mhd").write_bytes(local)
    np.testing.assert_array_equal(read([tmp_path / "local.mhd"]), values)


def test_a_metaimage_claiming_more_than_its_data_is_refused_with_the_claim(tmp_path):
    folder = tmp_path / "bomb"
    header = write_header(folder / "scan.mhd", "scan.raw", dims=(500, 65535, 65535))
    (folder / "scan.raw").write_bytes(b"\0" * 64)
    with pytest.raises(InputError) as error:
        read([header, folder / "scan.raw"])
    assert "claims 65535 x 65535 x 500 voxels of MET_SHORT" in error.value.cause
    assert "stores only 64 B" in error.value.cause
    # compressed: deflate cannot expand 64 bytes into gigabytes
    zheader = write_header(
        folder / "z.mhd",
        "z.zraw",
        dims=(500, 4096, 4096),
        extra="CompressedData = True\nCompressedDataSize = 64\n",
    )
    (folder / "z.zraw").write_bytes(zlib.compress(b"\0" * 1000)[:64].ljust(64, b"\0"))
    with pytest.raises(InputError, match="1032:1"):
        read([zheader, folder / "z.zraw"])


def test_a_metaimage_that_claims_more_than_memory_is_refused_before_reading(tmp_path):
    from medprep.ct import metaimage

    folder = tmp_path / "big"
    header = write_header(folder / "scan.mhd", "scan.raw")
    (folder / "scan.raw").write_bytes(voxels().tobytes())
    parsed = metaimage.read_header(str(header), [str(header), str(folder / "scan.raw")])
    metaimage.check_claim(parsed, memory_bytes=10**9)
    with pytest.raises(InputError, match="of memory this job can have"):
        metaimage.check_claim(parsed, memory_bytes=1000)


def test_a_nifti_pair_header_named_nii_is_refused(tmp_path):
    nib.save(nib.Nifti1Pair(voxels().transpose(2, 1, 0), np.eye(4)), tmp_path / "pair.img")
    fake = tmp_path / "scan.nii"
    fake.write_bytes((tmp_path / "pair.hdr").read_bytes())
    with pytest.raises(InputError, match="not a single-file NIfTI"):
        read([fake])


def test_a_nifti_claiming_more_than_its_compressed_bytes_is_refused(tmp_path):
    image = nib.Nifti1Image(voxels().transpose(2, 1, 0), np.eye(4))
    image.header.set_data_shape((30000, 30000, 400))
    raw = image.header.binaryblock + b"\0" * 4 + b"\0" * 1024
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(InputError) as error:
        read([path])
    assert "claims 30000 x 30000 x 400 voxels" in error.value.cause


##### DICOM files claiming more pixels than they hold

BOMB_SCRIPT = """
import json, resource, sys, time
from medprep.common.errors import InputError
from medprep.ct.preprocess import load_series
started = time.perf_counter()
try:
    load_series(sys.argv[1:])
    outcome = "loaded"
except InputError as error:
    outcome = str(error)
# the peak resident memory of this program: VmHWM (ru_maxrss keeps the high-water mark of
# the process it was forked from, a large pytest, across exec)
try:
    with open("/proc/self/status") as status:
        line = next(v for v in status if v.startswith("VmHWM:"))
    peak_mb = int(line.split()[1]) / 1024
except OSError:
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - started,
                  "peak_mb": peak_mb}))
"""


def rle_bomb(path: Path, *, z: float = 0.0, side: int = 65535, frames: int = 1) -> Path:
    """A CT file in RLE Lossless claiming ``side`` x ``side`` 16-bit pixels per frame, its
    pixel data a few runs of zeros (decoding it would fill the claim); with ``frames`` > 1
    an Enhanced CT with shared and per-frame functional groups."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import RLELossless, generate_uid

    enhanced = frames > 1
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2" + (".1" if enhanced else "")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = RLELossless
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "1.2.3", "1.2.3.4", "1.2.5"
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.7, 0.7], 1
    orientation = [1, 0, 0, 0, 1, 0]
    if enhanced:
        ds.NumberOfFrames = frames
        plane = Dataset()
        plane.ImageOrientationPatient = orientation
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        shared.PlaneOrientationSequence = Sequence([plane])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        per_frame = []
        for k in range(frames):
            position = Dataset()
            position.ImagePositionPatient = [0.0, 0.0, float(k)]
            item = Dataset()
            item.PlanePositionSequence = Sequence([position])
            per_frame.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    else:
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, z], orientation
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1
    # RLE frame: a 64-byte header naming 2 segments (high and low bytes), each 8 runs
    segment = bytes([0x81, 0]) * 8
    offsets = (2, 64, 64 + len(segment))
    header = b"".join(v.to_bytes(4, "little") for v in offsets).ljust(64, b"\0")
    ds.PixelData = encapsulate([header + segment + segment] * frames)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def run_bomb(files: list[Path]) -> dict:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_rle_slices_and_an_enhanced_ct_claiming_gigapixels_are_refused_unread(tmp_path):
    (tmp_path / "rle").mkdir()
    (tmp_path / "enhanced").mkdir()
    slices = [rle_bomb(tmp_path / "rle" / f"{k}.dcm", z=k) for k in range(2)]
    assert all(p.stat().st_size < 2048 for p in slices)
    enhanced = rle_bomb(tmp_path / "enhanced" / "frames.dcm", frames=500)
    for files, claim in (
        (slices, "65535 x 65535 pixels x 1 frame(s) x 1 sample(s) x 16 bits (8.6 GB decoded)"),
        (
            [enhanced],
            "65535 x 65535 pixels x 500 frame(s) x 1 sample(s) x 16 bits (4.3 TB decoded)",
        ),
    ):
        result = run_bomb(files)
        outcome = result["outcome"]
        assert "\n" not in outcome and "Traceback" not in outcome
        assert outcome.startswith(f"file {files[0]}: invalid pixel data: claims {claim}")
        assert (
            "more than 64:1 (a damaged header or a decompression bomb); refused unread" in outcome
        )
        # nothing of the claim was allocated: the interpreter and its libraries only
        assert result["peak_mb"] < 400 and result["seconds"] < 10, result


def test_a_compressed_frame_claiming_another_size_than_its_header_is_refused(tmp_path):
    from ct_support import SLAB, compress_file, dicom_files

    folder = tmp_path / "jpegls"
    folder.mkdir()
    for source in dicom_files(SLAB):
        compress_file(source, folder / source.name, "jpegls")
    victim = sorted(folder.iterdir())[1]
    data = bytearray(victim.read_bytes())
    sof = data.index(b"\xff\xf7")  # JPEG-LS frame header: P, Y, X
    data[sof + 5 : sof + 9] = (65535).to_bytes(2, "big") * 2
    victim.write_bytes(bytes(data))
    result = run_bomb(sorted(folder.iterdir()))
    assert result["outcome"] == (
        f"file {victim}: compressed frame 0 claims 65535 x 65535 pixels of 1 component(s) "
        "but the DICOM header says 512 x 512 of 1 (a damaged header or a decompression "
        "bomb); refused unread"
    )
    assert result["peak_mb"] < 600, result


def test_a_deflated_dataset_is_counted_before_pydicom_inflates_it(tmp_path):
    import pydicom
    from ct_support import SLAB, dicom_files
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from medprep.ct import dicom_io

    ds = pydicom.dcmread(dicom_files(SLAB)[0])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.Rows = ds.Columns = 4096  # 32 MB of zeros deflates to about 32 KB
    ds.PixelData = bytes(4096 * 4096 * 2)
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 100_000
    dicom_io.check_deflated_size(str(path), memory_bytes=64_000_000)
    with pytest.raises(InputError, match="inflates to more than the 16.0 MB of memory"):
        dicom_io.check_deflated_size(str(path), memory_bytes=16_000_000)
    # inflated, its claim is checked as native data: every pixel must be stored
    ds.Rows = ds.Columns = 8192
    ds.save_as(path, enforce_file_format=True)
    rejected = dicom_io.read_file(0, str(path))
    assert "stores only 33.6 MB (truncated or damaged)" in rejected.reason


##### coordinates and sizes far outside any scan or slide

LUNA_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"


@pytest.mark.parametrize(
    ("row", "column", "value"),
    [
        ("1.2.3,1e308,10,20,5", "coordX", "1e+308 is beyond +-1e+07 mm"),
        ("1.2.3,10,-2e7,20,5", "coordY", "-2e+07 is beyond +-1e+07 mm"),
        ("1.2.3,10,10,20,1e300", "diameter_mm", "1e+300 is beyond +-1e+07 mm"),
    ],
)
def test_a_luna16_row_far_outside_any_scan_is_refused_with_line_column_and_value(
    tmp_path, row, column, value
):
    from medprep.ct import labels

    path = tmp_path / "annotations.csv"
    path.write_text(LUNA_HEADER + "1.2.3,-100.5,67.2,-231.9,6.4\n" + row + "\n")
    with pytest.raises(InputError) as error:
        labels.read_csv(path, series_uid_hash=None, require_series=False)
    assert str(error.value) == (
        f"file {path}: annotation CSV: line 3, column '{column}': {value}, outside any "
        "slide or scan"
    )


def test_lidc_outlines_far_outside_any_scan_are_refused(tmp_path):
    from ct_support import XML

    from medprep.ct import lidc

    text = XML.read_text()
    far = text.replace("<xCoord>312</xCoord>", "<xCoord>99999999999999999999</xCoord>", 1)
    with pytest.raises(InputError, match=r"nodule 'Nodule 001'.*xCoord 1e\+20 is beyond"):
        lidc.parse_lidc_xml(far.encode())
    infinite = text.replace(
        "<imageZposition>-125.000000 </imageZposition>", "<imageZposition>inf</imageZposition>", 1
    )
    with pytest.raises(InputError, match="imageZposition inf is not a finite number"):
        lidc.parse_lidc_xml(infinite.encode())


def square(half: float, name: str = "tumour") -> dict:
    ring = [[-half, -half], [half, -half], [half, half], [-half, half], [-half, -half]]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"classification": {"name": name}},
    }


@pytest.mark.parametrize("half", [1e308, 2e7])
def test_a_geojson_coordinate_far_outside_any_slide_is_refused(tmp_path, half):
    from medprep.wsi import labels

    path = tmp_path / "regions.geojson"
    near = square(500.0, "stroma")
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [near, square(half)]}))
    with pytest.raises(InputError) as error:
        labels.read_annotations(path)
    assert str(error.value) == (
        f"file {path}: feature 1: coordinate [{-half:g}, {-half:g}] is beyond +-1e+07 "
        "pixels, outside any slide"
    )


@pytest.mark.parametrize(
    ("spacing", "cause"),
    [
        ((1e-30, 1e-30, 1.0), "invalid spacing [1e-30, 1e-30]: must be in [0.01, 100] mm"),
        ((0.7, 0.7, 1e-6), "slice spacing 1e-06 mm is outside [0.01, 100] mm"),
    ],
)
def test_a_volume_with_a_spacing_below_any_scan_is_refused(tmp_path, spacing, cause):
    # 1e-6 mm slices all fell within the duplicate tolerance: the geometry kept one slice
    # of 20 and the resampler failed with a ValueError and a traceback
    path = tmp_path / "thin.nii.gz"
    nib.save(nib.Nifti1Image(voxels().transpose(2, 1, 0), np.diag([*spacing, 1.0])), path)
    with pytest.raises(InputError) as error:
        pp.preprocess([path])
    assert error.value.cause.startswith(cause)


def test_two_slices_a_kilometre_apart_are_refused_before_resampling(tmp_path):
    import pydicom
    from ct_support import CT_3SLICE, dicom_files

    for k, source in enumerate(dicom_files(CT_3SLICE)[:2]):
        ds = pydicom.dcmread(source)
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(k * 900_000)]
        ds.save_as(tmp_path / source.name)
    with pytest.raises(InputError) as error:
        pp.preprocess(sorted(tmp_path.iterdir()))
    assert error.value.cause.startswith(
        "claims slices 900000 mm apart end to end, resampled to 900001 x "
    )
    assert "of memory this job can have" in error.value.cause


def test_a_nifti_with_a_side_beyond_any_scan_is_refused(tmp_path):
    # NIfTI-1 sides stop at 32767; NIfTI-2 sides are 64-bit
    image = nib.Nifti2Image(np.zeros((1, 1, 70000), np.int16), np.eye(4))
    path = tmp_path / "long.nii.gz"
    nib.save(image, path)
    with pytest.raises(InputError, match="NIfTI dimensions 1 x 1 x 70000: each side must be"):
        read([path])


##### slide formats whose index file names other files


def write_vms(folder: Path, image_file: str) -> Path:
    """A Hamamatsu VMS index (an INI file) naming its JPEG and map image."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "slide.vms"
    path.write_text(
        "[Virtual Microscope Specimen]\nNoLayers=1\nNoJpegColumns=1\nNoJpegRows=1\n"
        f"ImageFile={image_file}\nMapFile=map.jpg\n"
        "PhysicalWidth=1000000\nPhysicalHeight=1000000\n"
    )
    return path


def write_jpeg(path: Path, shape: tuple[int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (*shape, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90, restart_marker_rows=1)


def test_a_vms_naming_an_image_outside_its_folder_is_refused_before_openslide(tmp_path):
    import openslide

    from medprep.wsi.slide import open_slide, pick_slide_file

    write_jpeg(tmp_path / "elsewhere" / "secret.jpg", (512, 768))
    write_jpeg(tmp_path / "sample" / "map.jpg", (64, 96))
    write_jpeg(tmp_path / "sample" / "own.jpg", (256, 256))
    evil = write_vms(tmp_path / "sample", "../elsewhere/secret.jpg")
    # OpenSlide itself follows the name: the slide takes the outside file's size
    assert openslide.OpenSlide(str(evil)).dimensions == (768, 512)
    for call in (open_slide, lambda p: pick_slide_file([p, tmp_path / "sample" / "map.jpg"])):
        with pytest.raises(InputError) as error:
            call(evil)
        assert error.value.path == str(evil)
        assert "ImageFile names '../elsewhere/secret.jpg', outside the slide's folder" in str(
            error.value
        )
    good = write_vms(tmp_path / "sample", "own.jpg")
    assert open_slide(good).dimensions == (256, 256)


@pytest.mark.parametrize(
    "key, value", [("INDEXFILE", "../../Index.dat"), ("FILE_1", "/etc/passwd")]
)
def test_a_mirax_naming_data_outside_its_folder_is_refused(tmp_path, key, value):
    from medprep.wsi.slide import open_slide

    slide = tmp_path / "slide.mrxs"
    slide.write_bytes(b"not read")
    (tmp_path / "slide").mkdir()
    names = {"INDEXFILE": "Index.dat", "FILE_0": "Data0000.dat", "FILE_1": "Data0001.dat"}
    names[key] = value
    (tmp_path / "slide" / "Slidedat.ini").write_text(
        "[GENERAL]\nSLIDE_ID=x\n"
        f"[HIERARCHICAL]\nINDEXFILE={names['INDEXFILE']}\n"
        f"[DATAFILE]\nFILE_COUNT=2\nFILE_0={names['FILE_0']}\nFILE_1={names['FILE_1']}\n"
    )
    with pytest.raises(InputError) as error:
        open_slide(slide)
    assert error.value.path == str(tmp_path / "slide" / "Slidedat.ini")
    assert f"{key} names {value!r}" in error.value.cause


##### the same through the workflow, from S3: nothing of the worker's is published


@pytest.mark.slow
def test_a_metaimage_from_s3_listing_local_files_publishes_nothing_of_them(world):
    from workflow_support import write_config, write_samples

    world.upload("ct/phantom-chest-01")
    values = voxels()
    listing = "LIST 2D\n/proc/self/environ\n/etc/passwd\n" + "\n".join(
        "scan.raw" for _ in range(SHAPE[0] - 2)
    )
    world.s3.put_object(
        Bucket=world.bucket, Key="evil/scan.mhd", Body=header_text(listing).encode()
    )
    world.s3.put_object(Bucket=world.bucket, Key="evil/scan.raw", Body=values.tobytes())
    write_samples(
        world.workdir,
        [
            ("evil", "ct", f"s3://{world.bucket}/evil/scan.mhd"),
            ("good", "ct", world.uri("ct/phantom-chest-01")),
        ],
    )
    write_config(
        world.workdir,
        destination=f"s3://{world.bucket}/published",
        storage={"endpoint_url": world.endpoint, "region": "us-east-1"},
    )
    run = world.run("--keep-going", check=False)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("medprep error:")]
    evil = [line for line in lines if "sample evil" in line]
    assert evil and "scan.mhd" in evil[0] and "ElementDataFile" in evil[0], lines
    assert "/proc/self/environ" in evil[0] and "absolute path" in evil[0]
    published = world.published()
    assert "ct/good" in published and not [k for k in published if k.endswith("/evil")]
    secret = world.env["AWS_SECRET_ACCESS_KEY"].encode()
    for page in world.s3.get_paginator("list_objects_v2").paginate(Bucket=world.bucket):
        for entry in page.get("Contents", []):
            body = world.s3.get_object(Bucket=world.bucket, Key=entry["Key"])["Body"].read()
            if entry["Key"].endswith(".gz"):
                body = gzip.decompress(body)
            assert secret not in body, entry["Key"]
            assert b"root:x:0:0" not in body, entry["Key"]
    failure = json.loads((world.workdir / "logs/failures/evil.preprocess.json").read_text())
    assert failure["kind"] == "input"


##### a republish that does not fit keeps the last good publication (a 30 MB file system)


@pytest.mark.slow
def test_a_republish_on_a_full_destination_keeps_the_last_publication_and_its_index(
    workdir, tmp_path
):
    import os
    import subprocess

    from workflow_support import run_snakemake, write_config, write_samples

    from medprep.data import open_dataset

    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(small)], capture_output=True
    )
    if os.geteuid() != 0 or mounted.returncode != 0:
        pytest.skip(f"cannot mount a 30 MB tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        write_samples(workdir, [("synthetic-01", "wsi", "data/wsi/synthetic-01.tiff")])
        write_config(workdir, destination=str(small / "published"))
        run_snakemake(workdir)
        folder = small / "published" / "wsi" / "synthetic-01"
        before = json.loads((folder / "manifest.json").read_text())
        index = json.loads((small / "published/dataset/samples/manifest.json").read_text())
        pixels = [tile for tile, _ in open_dataset(small / "published").tiles]
        # another file system fills it up: 8 KB left, less than the new tiles need
        stats = os.statvfs(small)
        filler = small / "filler"
        filler.write_bytes(bytes(stats.f_bavail * stats.f_frsize - 8192))

        tiles = {"size": 128, "shard_max_tiles": 50, "quality": 80}  # new tiles, same slide
        write_config(workdir, destination=str(small / "published"), wsi={"tile": tiles})
        run = run_snakemake(workdir, check=False)

        assert run.returncode != 0
        lines = [line for line in run.stderr.splitlines() if line.startswith("medprep error:")]
        first = (
            f"medprep error: sample synthetic-01: file {folder}: not enough space left on the "
            "device: publishing needs "
        )
        assert lines and lines[0].startswith(first), lines
        assert "are free; nothing was switched, the previous publication is kept" in lines[0]
        assert all("(destination full, not retried)" in line for line in lines[1:]), lines
        log = (workdir / "logs/upload/wsi/synthetic-01.log").read_text()
        assert "Traceback" not in log and "unexpected" not in run.stderr
        failure = json.loads((workdir / "logs/failures/synthetic-01.upload.json").read_text())
        assert failure["kind"] == "destination"
        # a reader still sees the last publication, whole, and the index still points at it
        assert json.loads((folder / "manifest.json").read_text()) == before
        for entry in before["files"]:
            data = (folder / entry["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["name"]
        assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", before["version"]]
        again = json.loads((small / "published/dataset/samples/manifest.json").read_text())
        assert again == index
        reread = [tile for tile, _ in open_dataset(small / "published").tiles]
        assert len(reread) == len(pixels)
        for old, new in zip(pixels, reread, strict=True):
            np.testing.assert_array_equal(old, new)

        # room again: the next run publishes the new version and the old one goes
        filler.unlink()
        rerun = run_snakemake(workdir)
        assert ("upload", "synthetic-01") in rerun.ran()
        after = json.loads((folder / "manifest.json").read_text())
        assert after["version"] != before["version"]
        assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", after["version"]]
        assert len(open_dataset(small / "published").tiles) == len(pixels)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


##### a lost S3 publication is rebuilt from the source


@pytest.mark.slow
def test_a_lost_s3_publication_is_rebuilt_from_the_source_without_forcerun(world, monkeypatch):
    from s3_workflow_support import assert_published_complete, chain
    from workflow_support import write_config

    from medprep.data import open_dataset

    samples = [
        ("phantom-chest-01", "ct", "ct/phantom-chest-01"),
        ("slide", "wsi", "wsi/synthetic-01.tiff"),
    ]
    for _, _, relative in samples:
        world.upload(relative)
    world.configure(samples)
    settings = {"endpoint_url": world.endpoint, "region": "us-east-1"}
    # the default: working files are removed after upload for s3:// inputs
    write_config(world.workdir, destination=f"s3://{world.bucket}/published", storage=settings)
    assert world.run().ran() == chain("phantom-chest-01", "ct") | chain("slide", "wsi")
    before = world.published()

    # the destination loses both samples (a lifecycle rule, a deleted prefix)
    for name, modality, _ in samples:
        prefix = f"published/{modality}/{name}/"
        for key in world.objects(prefix):
            world.s3.delete_object(Bucket=world.bucket, Key=key)
    proxy = world.swap_proxy()

    rerun = world.run()

    assert rerun.ran() == {
        ("rebuild", "phantom-chest-01"),
        ("preprocess_ct", "phantom-chest-01"),
        ("tile_ct", "phantom-chest-01"),
        ("upload", "phantom-chest-01"),
        ("rebuild", "slide"),
        ("tile_wsi", "slide"),
        ("upload", "slide"),
    }, "the step that makes the lost working files, and what follows it; no download"
    lines = [line for line in rerun.stderr.splitlines() if "since it was published" in line]
    assert len(lines) == 2
    assert "its working files are gone too: preprocess_ct runs again from the source" in (
        next(line for line in lines if "phantom-chest-01" in line)
    )
    assert "tile_wsi runs again" in next(line for line in lines if "slide" in line)
    fetched = [p for method, p, _ in proxy.stats()["history"] if method == "GET"]
    assert [p for p in fetched if f"/{world.bucket}/ct/phantom-chest-01/" in p], "source refetched"
    assert [p for p in fetched if p.endswith("/wsi/synthetic-01.tiff")]
    assert_published_complete(world, samples)
    assert world.published() == before, "rebuilt byte for byte"
    assert world.run().ran() == set(), "nothing more to do"
    for name, value in world.env.items():  # the index, read as a user would
        monkeypatch.setenv(name, value)
    storage.clear_caches()
    index = open_dataset(f"s3://{world.bucket}/published", settings=settings)
    assert len(index.samples) == 2 and len(index.tiles) and len(index.patches)
    assert index.patches[0][0].size and index.tiles[0][0].size
    storage.clear_caches()
