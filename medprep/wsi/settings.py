"""The ``wsi:`` settings of config.yaml as typed, frozen dataclasses.

Defaults and limits are those of ``schemas/config.schema.yaml`` (see
``medprep.common.settings.settings_section``): the classes declare each field's type, a
test checks them against the schema, and no default is restated here. Rules pass plain
dicts (``config["wsi"]["tile"]`` and so on); ``from_config`` fills in the defaults and
rejects unknown keys in one line, so a typo in a config key fails instead of being
silently ignored; building one with a value outside the schema's limits fails the same way.
"""

from __future__ import annotations

from medprep.common.settings import Settings, settings_section


@settings_section("wsi", "resolution")
class ResolutionSettings(Settings):
    """``wsi.resolution``: level if set, else magnification if set, else mpp.

    ``tolerance``: a pyramid level whose resolution is within this relative difference of
    the target is used as it is, without resampling (see resolution.py);
    ``max_upsample``: the largest factor level-0 pixels may be enlarged by before the
    slide is refused.
    """

    mpp: float
    magnification: float | None
    level: int | None
    mpp_fallback: float | None
    tolerance: float
    max_upsample: float


@settings_section("wsi", "tissue")
class TissueSettings(Settings):
    """``wsi.tissue``: how the low-resolution tissue mask is computed."""

    mask_mpp: float
    mode: str
    threshold: float | None
    min_threshold: float
    closing_um: float
    min_object_um2: float
    fill_holes: bool


@settings_section("wsi", "tile", "filters")
class FilterSettings(Settings):
    """``wsi.tile.filters``: optional QC filters; ``None`` = off."""

    max_background: float | None
    min_blur: float | None
    min_tissue_fraction: float | None
    min_sharpness: float | None
    max_pen_fraction: float | None
    max_fold_fraction: float | None
    max_gap_fraction: float | None


@settings_section("wsi", "tile", "labels")
class LabelSettings(Settings):
    """``wsi.tile.labels``: region labels of tiles from the sample's annotations."""

    background: str
    class_fractions: bool


@settings_section("wsi", "tile")
class TileSettings(Settings):
    """``wsi.tile``: the grid, the QC filters and how pixels are written."""

    size: int
    stride: int | None
    min_tissue: float
    format: str
    quality: int
    container: str
    coords_scores: bool
    shard_max_tiles: int
    block_tiles: int
    max_read_errors: int
    annotated_only: bool
    labels: LabelSettings
    filters: FilterSettings

    @property
    def step(self) -> int:
        """The grid's step in target pixels: the stride, or the tile size."""
        return self.stride or self.size

    @property
    def image_format(self) -> str | None:
        """The encoding of the tiles' pixels, None when only coordinates are written."""
        return None if self.container == "coords" else self.format
