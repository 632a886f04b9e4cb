"""Stored pixel values to Hounsfield units, padding to air, and the reference normalisation.

The modality LUT (PS3.3 C.11.1): a Modality LUT Sequence if present, else Rescale Slope and
Intercept; without either the stored values are the output units (identity). Padding
(PixelPaddingValue, optionally up to PixelPaddingRangeLimit) is found on the stored values,
before rescaling, and becomes air. Without a declared padding value, the legacy stored value
-2000 counts as padding when it maps below -1024 HU (GE's convention; with intercept -1024 it
would be -3024 HU, which no tissue has).
"""

from __future__ import annotations

import dataclasses

import numpy as np

AIR_HU = -1000
# Reconstructed CT does not go below this; lower values are padding or outside the FOV.
HU_FLOOR = -1024
HU_CEILING = 32767
LEGACY_PADDING = -2000


@dataclasses.dataclass(frozen=True)
class ModalityTransform:
    slope: float = 1.0
    intercept: float = 0.0
    lut: tuple[int, ...] | None = None  # Modality LUT entries
    lut_first: int = 0  # the stored value mapped to the first entry
    source: str = "rescale"  # "rescale", "lut" or "identity"

    @classmethod
    def from_tags(
        cls,
        slope: float | None,
        intercept: float | None,
        lut: tuple[tuple[int, ...], int] | None = None,
    ) -> ModalityTransform:
        if lut is not None:
            return cls(lut=tuple(lut[0]), lut_first=int(lut[1]), source="lut")
        if slope is None and intercept is None:
            return cls(source="identity")
        return cls(
            slope=1.0 if slope is None else float(slope),
            intercept=0.0 if intercept is None else float(intercept),
        )

    def apply(self, stored: np.ndarray) -> np.ndarray:
        """Output units (float32) of stored values."""
        if self.lut is not None:
            table = np.asarray(self.lut, dtype=np.float32)
            index = np.clip(stored.astype(np.int64) - self.lut_first, 0, table.size - 1)
            return table[index]
        out = stored.astype(np.float32)
        if self.slope != 1.0:
            out *= np.float32(self.slope)
        if self.intercept != 0.0:
            out += np.float32(self.intercept)
        return out


@dataclasses.dataclass(frozen=True)
class Padding:
    value: int | None = None
    range_limit: int | None = None

    def mask(self, stored: np.ndarray, transform: ModalityTransform) -> np.ndarray:
        if self.value is not None:
            if self.range_limit is None:
                return stored == self.value
            low, high = sorted((self.value, self.range_limit))
            return (stored >= low) & (stored <= high)
        if np.issubdtype(stored.dtype, np.signedinteger):
            legacy_hu = transform.apply(np.array([LEGACY_PADDING]))[0]
            if legacy_hu < HU_FLOOR:
                return stored == LEGACY_PADDING
        return np.zeros(stored.shape, dtype=bool)


@dataclasses.dataclass(frozen=True)
class SliceHU:
    hu: np.ndarray  # int16
    padding: int  # pixels that were padding
    clamped_low: int  # non-padding pixels below HU_FLOOR raised to it


def _shifted(stored: np.ndarray, intercept: int) -> np.ndarray:
    """``stored + intercept`` exactly: in int16 when every value fits (half the memory
    traffic of int32), else in int32."""
    if stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2 and stored.size:
        low, high = int(stored.min()), int(stored.max())
        fits = low + intercept >= -32768 and high + intercept <= 32767
        if fits and high <= 32767 and -32768 <= intercept <= 32767:
            return np.add(stored, intercept, dtype=np.int16, casting="unsafe")
    return np.add(stored, intercept, dtype=np.int32)


def to_hu(stored: np.ndarray, transform: ModalityTransform, padding: Padding) -> SliceHU:
    """HU (int16) of a slice of stored values; padding becomes AIR_HU."""
    pad = padding.mask(stored, transform)
    if transform.lut is None and transform.slope == 1.0 and float(transform.intercept).is_integer():
        values = _shifted(stored, int(transform.intercept))
    else:
        values = transform.apply(stored)
        np.rint(values, out=values)
    low = values < HU_FLOOR
    if pad.any():
        low &= ~pad
    clamped = int(np.count_nonzero(low))
    out = np.empty(stored.shape, dtype=np.int16)
    np.clip(values, HU_FLOOR, HU_CEILING, out=out, casting="unsafe")
    out[pad] = AIR_HU
    return SliceHU(out, int(np.count_nonzero(pad)), clamped)


def normalise(hu: np.ndarray, min_hu: float, max_hu: float, mean: float) -> np.ndarray:
    """Scale [min_hu, max_hu] to [0, 1], clip, subtract ``mean`` (float32); the values
    are the ``ct.normalise`` settings."""
    if max_hu <= min_hu:
        raise ValueError(f"normalise: max_hu ({max_hu}) must exceed min_hu ({min_hu})")
    out = hu.astype(np.float32)
    out -= np.float32(min_hu)
    out *= np.float32(1.0 / (max_hu - min_hu))
    np.clip(out, 0.0, 1.0, out=out)
    out -= np.float32(mean)
    return out
