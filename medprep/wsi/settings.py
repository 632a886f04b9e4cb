"""The ``wsi:`` settings of config.yaml as frozen dataclasses with the schema's defaults.

Rules pass plain dicts (``config["wsi"]["tile"]`` and so on); ``from_config`` fills in the
defaults and rejects unknown keys, so a typo in a config key fails instead of being
silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

S = TypeVar("S")

TISSUE_MODES = ("auto", "brightfield", "fluorescence")
TILE_FORMATS = ("jpeg", "png")
CONTAINERS = ("tar", "folder", "coords")


def _from_mapping(cls: type[S], config: Mapping[str, Any] | None, section: str) -> S:
    values = dict(config or {})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in {section}: {', '.join(unknown)}")
    return cls(**values)


@dataclass(frozen=True)
class ResolutionSettings:
    """``wsi.resolution``: level if set, else magnification if set, else mpp."""

    mpp: float = 0.5
    magnification: float | None = None
    level: int | None = None
    mpp_fallback: float | None = None
    # A pyramid level whose resolution is within this relative difference of the target
    # is used as it is, without resampling (0 = always resample to the exact target).
    # 2.5% takes Aperio's 0.2527/0.5027 um/px (0.5-1.1% off 0.25/0.5) natively and still
    # resamples 0.2425 (3%) and Hamamatsu's 0.2270/0.4540 (9%); see resolution.py.
    tolerance: float = 0.025
    # Largest upsampling factor (level-0 pixels enlarged by at most this much) before the
    # slide is refused; 1.0 = never upsample beyond ``tolerance``.
    max_upsample: float = 1.0

    def __post_init__(self) -> None:
        if self.mpp is None or self.mpp <= 0:
            raise ValueError(f"wsi.resolution.mpp must be positive, got {self.mpp}")
        if self.magnification is not None and self.magnification <= 0:
            raise ValueError(
                f"wsi.resolution.magnification must be positive, got {self.magnification}"
            )
        if self.level is not None and self.level < 0:
            raise ValueError(f"wsi.resolution.level must be >= 0, got {self.level}")
        if self.mpp_fallback is not None and self.mpp_fallback <= 0:
            raise ValueError(
                f"wsi.resolution.mpp_fallback must be positive, got {self.mpp_fallback}"
            )
        if not 0 <= self.tolerance < 0.5:
            raise ValueError(f"wsi.resolution.tolerance must be in [0, 0.5), got {self.tolerance}")
        if not self.max_upsample >= 1:
            raise ValueError(f"wsi.resolution.max_upsample must be >= 1, got {self.max_upsample}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> ResolutionSettings:
        return _from_mapping(cls, config, "wsi.resolution")


@dataclass(frozen=True)
class TissueSettings:
    """``wsi.tissue``: how the low-resolution tissue mask is computed."""

    mask_mpp: float = 8.0
    mode: str = "auto"
    threshold: float | None = None
    min_threshold: float = 8.0
    closing_um: float = 32.0
    min_object_um2: float = 20000.0
    fill_holes: bool = True

    def __post_init__(self) -> None:
        if self.mode not in TISSUE_MODES:
            raise ValueError(f"wsi.tissue.mode must be one of {TISSUE_MODES}, got {self.mode!r}")
        if not 1 <= self.mask_mpp <= 64:
            raise ValueError(f"wsi.tissue.mask_mpp must be in [1, 64], got {self.mask_mpp}")
        if self.closing_um < 0 or self.min_object_um2 < 0:
            raise ValueError("wsi.tissue.closing_um and min_object_um2 must be >= 0")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> TissueSettings:
        return _from_mapping(cls, config, "wsi.tissue")


@dataclass(frozen=True)
class FilterSettings:
    """``wsi.tile.filters``: optional QC filters; ``None`` = off."""

    max_background: float | None = None
    min_blur: float | None = None
    min_tissue_fraction: float | None = None
    min_sharpness: float | None = None
    max_pen_fraction: float | None = None
    max_fold_fraction: float | None = None
    max_gap_fraction: float | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> FilterSettings:
        return _from_mapping(cls, config, "wsi.tile.filters")


@dataclass(frozen=True)
class TileSettings:
    """``wsi.tile``: the grid, the QC filters and how pixels are written."""

    size: int = 256
    stride: int | None = None
    min_tissue: float = 0.5
    format: str = "jpeg"
    quality: int = 90
    container: str = "tar"
    # coords container: read every tile for the pixel QC scores even with no pixel filter on
    coords_scores: bool = False
    shard_max_tiles: int = 10000
    block_tiles: int = 8
    max_read_errors: int = 0
    filters: FilterSettings = field(default_factory=FilterSettings)

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 4096:
            raise ValueError(f"wsi.tile.size must be in [16, 4096], got {self.size}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"wsi.tile.stride must be >= 1, got {self.stride}")
        if not 0 <= self.min_tissue <= 1:
            raise ValueError(f"wsi.tile.min_tissue must be in [0, 1], got {self.min_tissue}")
        if self.format not in TILE_FORMATS:
            raise ValueError(f"wsi.tile.format must be one of {TILE_FORMATS}, got {self.format!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"wsi.tile.quality must be in [1, 100], got {self.quality}")
        if self.container not in CONTAINERS:
            raise ValueError(
                f"wsi.tile.container must be one of {CONTAINERS}, got {self.container!r}"
            )
        if self.shard_max_tiles < 1 or self.block_tiles < 1 or self.max_read_errors < 0:
            raise ValueError(
                "wsi.tile.shard_max_tiles and block_tiles must be >= 1, max_read_errors >= 0"
            )

    @property
    def step(self) -> int:
        return self.stride or self.size

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> TileSettings:
        values = dict(config or {})
        filters = values.pop("filters", None)
        if not isinstance(filters, FilterSettings):
            filters = FilterSettings.from_config(filters)
        return _from_mapping(cls, {**values, "filters": filters}, "wsi.tile")
