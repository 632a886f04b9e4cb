"""A synthetic chest CT written as real DICOM CT slices, with its ground truth.

The phantom is built per axial slice from analytic shapes in patient coordinates (LPS, mm):
a body (soft tissue with a fat rim), two lungs (ellipsoids, separate components unless
``bronchi`` joins them to the trachea), vessels and a nodule inside the lungs, a trachea,
a spine, an aorta, a table under the body and a circular field of view whose outside holds
``PixelPaddingValue``. In-plane anatomy is scaled to the field of view (nominal 360 mm);
the lungs span at most 250 mm of the scanned length, centred.

Stored values follow GE's convention: signed 16-bit, intercept -1024, slope 1, padding -2000.
No real patient data: names, IDs and dates are fixed fake values (useful for checking that
identifiers stay out of outputs).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

HU = {
    "air": -1000.0,
    "lung": -850.0,
    "fat": -100.0,
    "soft_tissue": 40.0,
    "vessel": 40.0,
    "nodule": 30.0,
    "aorta": 45.0,
    "bone": 700.0,
    "table": 200.0,
}

FAKE_IDENTIFIERS = {
    "PatientName": "PHANTOM^CHEST",
    "PatientID": "MEDPREP-PHANTOM-0001",
    "PatientBirthDate": "19700101",
    "StudyDate": "20200102",
    "SeriesDate": "20200102",
    "AcquisitionDate": "20200102",
    "ContentDate": "20200102",
    "StudyTime": "101112",
    "AccessionNumber": "ACC-PHANTOM-77",
    "InstitutionName": "Medprep Synthetic Hospital",
    "ReferringPhysicianName": "DOCTOR^PHANTOM",
    "StudyID": "PHSTUDY1",
}

NOMINAL_FOV_MM = 360.0
MAX_LUNG_HEIGHT_MM = 250.0


@dataclasses.dataclass(frozen=True)
class _Anatomy:
    scale: float  # in-plane scale from the nominal 360 mm field of view
    fov_radius: float
    lung_centre_z: float
    lung_half_height: float
    carina_z: float
    bronchus_end_z: float
    top_z: float  # highest slice position (trachea enters from here)

    def mm(self, value: float) -> float:
        return value * self.scale


def _anatomy(rows: int, cols: int, slices: int, pixel_mm: float, slice_mm: float) -> _Anatomy:
    fov = min(rows, cols) * pixel_mm
    length = (slices - 1) * slice_mm
    half = min(0.4 * length, MAX_LUNG_HEIGHT_MM / 2)
    centre = 0.0
    return _Anatomy(
        scale=fov / NOMINAL_FOV_MM,
        fov_radius=0.49 * fov,
        lung_centre_z=centre,
        lung_half_height=half,
        carina_z=centre + 0.6 * half,
        bronchus_end_z=centre + 0.3 * half,
        top_z=length / 2,
    )


LUNG_CENTRES_XY = ((-80.0, 0.0), (80.0, 0.0))  # right lung (patient right = -x in LPS), left lung
LUNG_SEMI_XY = (55.0, 75.0)
VESSEL_OFFSETS_XY = ((-15.0, -20.0), (12.0, 10.0), (0.0, 35.0))
VESSEL_RADIUS = 3.0
NODULE = (-80.0, -30.0, 0.3, 6.0)  # x, y, z as a fraction of the lung half height, radius
TRACHEA_XY = (0.0, -35.0)
TRACHEA_RADIUS = 9.0
BRONCHUS_RADIUS = 5.0
BRONCHUS_ENDS_XY = ((-60.0, -10.0), (60.0, -10.0))


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float
) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _lung_cross_section(anat: _Anatomy, z: float) -> float:
    """Factor (0..1] of the lung's in-plane semi-axes at height z; 0 outside the lungs."""
    t = (z - anat.lung_centre_z) / anat.lung_half_height
    return float(np.sqrt(1.0 - t * t)) if abs(t) < 1.0 else 0.0


def _segment_distance(
    x: np.ndarray, y: np.ndarray, z: float, a: np.ndarray, b: np.ndarray
) -> np.ndarray:
    """Distance of points (x, y, z) to the 3D segment a-b."""
    ab = b - a
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt(
        (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
    )


def _slice_labels(
    anat: _Anatomy, x: np.ndarray, y: np.ndarray, z: float, *, lungs: bool, bronchi: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """HU of one slice (without noise) and masks: lung, airway (outside the lungs), in-FOV."""
    s = anat.mm
    hu = np.full(x.shape, HU["air"], dtype=np.float32)
    body = _ellipse(x, y, 0.0, s(5.0), s(170.0), s(125.0))
    inner = _ellipse(x, y, 0.0, s(5.0), s(155.0), s(110.0))
    hu[body] = HU["fat"]
    hu[inner] = HU["soft_tissue"]
    table_top = s(5.0 + 125.0 + 6.0)
    table = (y >= table_top) & (y <= table_top + s(12.0)) & (np.abs(x) <= s(175.0))
    hu[table] = HU["table"]
    hu[_ellipse(x, y, 0.0, s(85.0), s(18.0), s(18.0))] = HU["bone"]
    hu[_ellipse(x, y, s(22.0), s(48.0), s(12.0), s(12.0))] = HU["aorta"]

    lung = np.zeros(x.shape, dtype=bool)
    factor = _lung_cross_section(anat, z) if lungs else 0.0
    if factor > 0:
        for cx, cy in LUNG_CENTRES_XY:
            lung |= _ellipse(
                x, y, s(cx), s(cy), s(LUNG_SEMI_XY[0]) * factor, s(LUNG_SEMI_XY[1]) * factor
            )
        hu[lung] = HU["lung"]
        vessels = np.zeros(x.shape, dtype=bool)
        for cx, cy in LUNG_CENTRES_XY:
            for dx, dy in VESSEL_OFFSETS_XY:
                vessels |= _ellipse(
                    x, y, s(cx + dx), s(cy + dy), s(VESSEL_RADIUS), s(VESSEL_RADIUS)
                )
        nx, ny, nz, nr = NODULE
        dz = z - (anat.lung_centre_z + nz * anat.lung_half_height)
        if abs(dz) < s(nr):
            r = np.sqrt(s(nr) ** 2 - dz * dz)
            vessels |= _ellipse(x, y, s(nx), s(ny), r, r)
        hu[vessels & lung] = HU["vessel"]

    airway = np.zeros(x.shape, dtype=bool)
    if lungs and z >= anat.carina_z:
        airway |= _ellipse(
            x, y, s(TRACHEA_XY[0]), s(TRACHEA_XY[1]), s(TRACHEA_RADIUS), s(TRACHEA_RADIUS)
        )
    if (
        lungs
        and bronchi
        and anat.bronchus_end_z - s(BRONCHUS_RADIUS) <= z <= anat.carina_z + s(BRONCHUS_RADIUS)
    ):
        carina = np.array([s(TRACHEA_XY[0]), s(TRACHEA_XY[1]), anat.carina_z])
        for ex, ey in BRONCHUS_ENDS_XY:
            end = np.array([s(ex), s(ey), anat.bronchus_end_z])
            airway |= _segment_distance(x, y, z, carina, end) <= s(BRONCHUS_RADIUS)
    hu[airway] = HU["air"]
    in_fov = x * x + y * y <= anat.fov_radius**2
    return hu, lung, airway & ~lung, in_fov


def _uid(seed: int, *parts: Any) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["medprep-chest-phantom", str(seed), *map(str, parts)])


def _base_dataset(
    *,
    rows: int,
    cols: int,
    pixel_mm: float,
    slice_mm: float,
    seed: int,
    intercept: float,
    slope: float,
    padding_value: int,
):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.Manufacturer = "medprep"
    ds.ManufacturerModelName = "synthetic chest phantom"
    for key, value in FAKE_IDENTIFIERS.items():
        setattr(ds, key, value)
    ds.PatientSex = "O"
    ds.SeriesTime = "101500"
    ds.StudyInstanceUID = _uid(seed, "study")
    ds.SeriesInstanceUID = _uid(seed, "series")
    ds.FrameOfReferenceUID = _uid(seed, "frame")
    ds.PositionReferenceIndicator = ""
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.SeriesDescription = "synthetic chest phantom"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.KVP = 120
    ds.ConvolutionKernel = "STANDARD"
    ds.GantryDetectorTilt = 0
    ds.SliceThickness = slice_mm
    ds.PixelSpacing = [pixel_mm, pixel_mm]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.add_new(0x00280120, "SS", padding_value)  # PixelPaddingValue
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    ds.RescaleType = "HU"
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    return ds


def write_chest_phantom(
    folder: str | os.PathLike,
    *,
    rows: int,
    cols: int,
    slices: int,
    pixel_mm: float,
    slice_mm: float,
    seed: int = 0,
    noise_hu: float = 15.0,
    lungs: bool = True,
    bronchi: bool = False,
    intercept: float = -1024.0,
    slope: float = 1.0,
    padding_value: int = -2000,
    return_labels: bool = False,
) -> dict[str, Any]:
    """Write a synthetic chest CT as ``slices`` DICOM files ``IM0001.dcm``... into ``folder``.

    Instance 1 is the highest slice (head first, z decreasing), so sorting by file name or
    instance number gives descending z. ``bronchi`` joins both lungs to the trachea through
    two main bronchi (as in a real chest at 1 mm); without it the lungs and trachea are three
    separate air components. ``lungs=False`` writes the same body without lungs or airways.

    Returns the ground truth: ``lung_volume_ml`` (lung voxels of the written grid, vessels
    and nodule inside the lungs included), ``airway_volume_ml`` (trachea and bronchi outside
    the lungs), ``hu`` (noise-free HU of each structure), geometry, file paths and, with
    ``return_labels``, the boolean ``lung`` array (slices, rows, cols) in file order.
    """
    from pydicom.uid import CTImageStorage

    if min(rows, cols, slices) < 1 or pixel_mm <= 0 or slice_mm <= 0:
        raise ValueError("phantom needs positive sizes and spacings")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    anat = _anatomy(rows, cols, slices, pixel_mm, slice_mm)
    x0 = -(cols - 1) / 2 * pixel_mm
    y0 = -(rows - 1) / 2 * pixel_mm
    x = (x0 + np.arange(cols, dtype=np.float32) * pixel_mm)[None, :]
    y = (y0 + np.arange(rows, dtype=np.float32) * pixel_mm)[:, None]
    x, y = np.broadcast_arrays(x, y)
    rng = np.random.default_rng(seed)
    ds = _base_dataset(
        rows=rows,
        cols=cols,
        pixel_mm=pixel_mm,
        slice_mm=slice_mm,
        seed=seed,
        intercept=intercept,
        slope=slope,
        padding_value=padding_value,
    )
    lung_voxels = 0
    airway_voxels = 0
    labels = np.zeros((slices, rows, cols), dtype=bool) if return_labels else None
    paths = []
    for k in range(slices):
        z = anat.top_z - k * slice_mm
        hu, lung, airway, in_fov = _slice_labels(anat, x, y, z, lungs=lungs, bronchi=bronchi)
        lung_voxels += int(np.count_nonzero(lung))
        airway_voxels += int(np.count_nonzero(airway))
        if labels is not None:
            labels[k] = lung
        if noise_hu > 0:
            hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_hu)
        np.maximum(hu, -1024.0, out=hu)  # scanners clip reconstructed air at -1024
        stored = np.rint((hu - intercept) / slope)
        stored = np.clip(stored, -32768, 32767).astype(np.int16)
        stored[~in_fov] = padding_value
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), round(z, 4)]
        ds.SliceLocation = round(z, 4)
        ds.SOPInstanceUID = _uid(seed, "instance", k)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SOPClassUID = CTImageStorage
        ds.PixelData = stored.tobytes()
        path = folder / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    voxel_ml = pixel_mm * pixel_mm * slice_mm / 1000.0
    half = anat.lung_half_height
    analytic = 2 * 4 / 3 * np.pi * anat.mm(LUNG_SEMI_XY[0]) * anat.mm(LUNG_SEMI_XY[1]) * half / 1000
    truth: dict[str, Any] = {
        "lung_volume_ml": lung_voxels * voxel_ml,
        "lung_volume_ml_analytic": float(analytic) if lungs else 0.0,
        "airway_volume_ml": airway_voxels * voxel_ml,
        "hu": dict(HU),
        "noise_hu": noise_hu,
        "shape": (slices, rows, cols),
        "spacing": (slice_mm, pixel_mm, pixel_mm),
        "fov_radius_mm": anat.fov_radius,
        "padding_value": padding_value,
        "intercept": intercept,
        "slope": slope,
        "series_uid": str(ds.SeriesInstanceUID),
        "z_positions": [anat.top_z - k * slice_mm for k in range(slices)],
        "lung_z_range": (anat.lung_centre_z - half, anat.lung_centre_z + half) if lungs else None,
        "files": paths,
        "identifiers": dict(FAKE_IDENTIFIERS),
    }
    if labels is not None:
        truth["lung"] = labels
    return truth
