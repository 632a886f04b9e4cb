"""The ``wsi:`` settings of config.yaml as typed, frozen dataclasses.

Defaults and limits are those of ``schemas/config.schema.yaml`` (see
``medprep.common.settings.settings_section``): the classes declare each field's type, a
test checks them against the schema, and no default is restated here. Rules pass plain
dicts (``config["wsi"]["tile"]`` and so on); ``from_config`` fills in the defaults and
rejects unknown keys in one line, so a typo in a config key fails instead of being
silently ignored; building one with a value outside the schema's limits fails the same way.
"""

from __future__ import annotations

from medprep.common.settings import FROM_SCHEMA, Settings, settings_section


@settings_section("wsi", "resolution")
class ResolutionSettings(Settings):
    """``wsi.resolution``: level if set, else magnification if set, else mpp.

    ``tolerance``: a pyramid level whose resolution is within this relative difference of
    the target is used as it is, without resampling (see resolution.py);
    ``max_upsample``: the largest factor level-0 pixels may be enlarged by before the
    slide is refused.
    """

    mpp: float = FROM_SCHEMA
    magnification: float | None = FROM_SCHEMA
    level: int | None = FROM_SCHEMA
    mpp_fallback: float | None = FROM_SCHEMA
    tolerance: float = FROM_SCHEMA
    max_upsample: float = FROM_SCHEMA


@settings_section("wsi", "tissue")
class TissueSettings(Settings):
    """``wsi.tissue``: how the low-resolution tissue mask is computed."""

    mask_mpp: float = FROM_SCHEMA
    mode: str = FROM_SCHEMA
    threshold: float | None = FROM_SCHEMA
    min_threshold: float = FROM_SCHEMA
    closing_um: float = FROM_SCHEMA
    min_object_um2: float = FROM_SCHEMA
    fill_holes: bool = FROM_SCHEMA


@settings_section("wsi", "tile", "filters")
class FilterSettings(Settings):
    """``wsi.tile.filters``: optional QC filters; ``None`` = off."""

    max_background: float | None = FROM_SCHEMA
    min_blur: float | None = FROM_SCHEMA
    min_tissue_fraction: float | None = FROM_SCHEMA
    min_sharpness: float | None = FROM_SCHEMA
    max_pen_fraction: float | None = FROM_SCHEMA
    max_fold_fraction: float | None = FROM_SCHEMA
    max_gap_fraction: float | None = FROM_SCHEMA


@settings_section("wsi", "tile", "labels")
class LabelSettings(Settings):
    """``wsi.tile.labels``: region labels of tiles from the sample's annotations."""

    background: str = FROM_SCHEMA
    class_fractions: bool = FROM_SCHEMA


@settings_section("wsi", "tile")
class TileSettings(Settings):
    """``wsi.tile``: the grid, the QC filters and how pixels are written."""

    size: int = FROM_SCHEMA
    stride: int | None = FROM_SCHEMA
    min_tissue: float = FROM_SCHEMA
    format: str = FROM_SCHEMA
    quality: int = FROM_SCHEMA
    container: str = FROM_SCHEMA
    coords_scores: bool = FROM_SCHEMA
    stain: str = FROM_SCHEMA
    shard_max_tiles: int = FROM_SCHEMA
    block_tiles: int = FROM_SCHEMA
    max_read_errors: int = FROM_SCHEMA
    annotated_only: bool = FROM_SCHEMA
    labels: LabelSettings = FROM_SCHEMA
    filters: FilterSettings = FROM_SCHEMA

    @property
    def step(self) -> int:
        """The grid's step in target pixels: the stride, or the tile size."""
        return self.stride or self.size

    @property
    def image_format(self) -> str | None:
        """The encoding of the tiles' pixels, None when only coordinates are written."""
        return None if self.container == "coords" else self.format
