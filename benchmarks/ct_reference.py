"""The reference lung CT preprocessing (DSB 2017 "full preprocessing tutorial" steps), as a
baseline for the benchmark. Written from the published description, not copied:

1. read every file in the folder with pydicom; sort by ImagePositionPatient z; the slice
   thickness is the z distance of the first two slices;
2. stack ``pixel_array`` as int16, set the stored value -2000 to 0, apply slope (in float64
   when it is not 1) and intercept per slice;
3. resample with ``scipy.ndimage.zoom(mode="nearest")`` to 1 mm, the zoom factor rounded to
   a whole output shape (cubic spline by default; ``order=1`` for the linear variant);
4. lung mask: ``image > -320`` as classes 1/2, ``skimage.measure.label`` of equal-valued
   regions, the region of voxel [0, 0, 0] set to 2 (outside air); per axial slice keep the
   largest non-air region and turn the rest to air (filling vessels); invert; keep the
   largest 3D component;
5. normalise [-1000, 400] to [0, 1], clip, subtract 0.25;
6. save the normalised volume and the mask as ``.npy``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import scipy.ndimage
from skimage import measure

MIN_BOUND = -1000.0
MAX_BOUND = 400.0
PIXEL_MEAN = 0.25


def load_scan(folder: str | os.PathLike) -> list:
    slices = [pydicom.dcmread(os.path.join(folder, name)) for name in os.listdir(folder)]
    slices.sort(key=lambda s: float(s.ImagePositionPatient[2]))
    thickness = abs(
        float(slices[0].ImagePositionPatient[2]) - float(slices[1].ImagePositionPatient[2])
    )
    for s in slices:
        s.SliceThickness = thickness
    return slices


def pixels_hu(slices: list) -> np.ndarray:
    image = np.stack([s.pixel_array for s in slices]).astype(np.int16)
    image[image == -2000] = 0
    for n, s in enumerate(slices):
        slope = float(s.RescaleSlope)
        intercept = float(s.RescaleIntercept)
        if slope != 1:
            image[n] = (slope * image[n].astype(np.float64)).astype(np.int16)
        image[n] += np.int16(intercept)
    return image


def resample(image: np.ndarray, slices: list, new_spacing=(1.0, 1.0, 1.0), order: int = 3):
    spacing = np.array([float(slices[0].SliceThickness), *map(float, slices[0].PixelSpacing)])
    new_shape = np.round(image.shape * spacing / np.asarray(new_spacing))
    factor = new_shape / image.shape
    resampled = scipy.ndimage.zoom(image, factor, mode="nearest", order=order)
    return resampled, spacing / factor


def _largest_label(labels: np.ndarray, background: int = -1):
    values, counts = np.unique(labels, return_counts=True)
    counts = counts[values != background]
    values = values[values != background]
    return values[np.argmax(counts)] if len(counts) else None


def segment_lung_mask(image: np.ndarray, fill_lung_structures: bool = True) -> np.ndarray:
    binary = np.array(image > -320, dtype=np.int8) + 1  # 1 air, 2 tissue
    labels = measure.label(binary)
    outside = labels[0, 0, 0]
    binary[labels == outside] = 2
    if fill_lung_structures:
        for i, axial in enumerate(binary):
            slice_labels = measure.label(axial - 1)  # background 0 = air
            largest = _largest_label(slice_labels, background=0)
            if largest is not None:
                binary[i][slice_labels != largest] = 1
    binary -= 1
    binary = 1 - binary
    labels = measure.label(binary, background=0)
    largest = _largest_label(labels, background=0)
    if largest is not None:
        binary[labels != largest] = 0
    return binary


def normalise(image: np.ndarray) -> np.ndarray:
    image = (image - MIN_BOUND) / (MAX_BOUND - MIN_BOUND)
    image[image > 1] = 1.0
    image[image < 0] = 0.0
    return image - PIXEL_MEAN


def run(folder: str | os.PathLike, out_dir: str | os.PathLike, order: int = 3) -> dict:
    """The whole reference chain, outputs written as .npy; returns shapes and spacing."""
    slices = load_scan(folder)
    image = pixels_hu(slices)
    resampled, spacing = resample(image, slices, order=order)
    mask = segment_lung_mask(resampled, True)
    normalised = normalise(resampled)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "normalised.npy", normalised)
    np.save(out / "mask.npy", mask)
    return {
        "shape_in": list(image.shape),
        "shape_out": list(resampled.shape),
        "spacing_out": [float(s) for s in spacing],
        "z_first": float(slices[0].ImagePositionPatient[2]),
    }
