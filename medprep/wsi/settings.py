"""The ``wsi:`` settings of config.yaml as frozen dataclasses.

Their fields, defaults and limits are those of ``schemas/config.schema.yaml`` (see
``medprep.common.settings.settings_section``): nothing is restated here. Rules pass plain dicts
(``config["wsi"]["tile"]`` and so on); ``from_config`` fills in the defaults and rejects
unknown keys in one line, so a typo in a config key fails instead of being silently
ignored; building one with a value outside the schema's limits fails the same way.
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


@settings_section("wsi", "tissue")
class TissueSettings(Settings):
    """``wsi.tissue``: how the low-resolution tissue mask is computed."""


@settings_section("wsi", "tile", "filters")
class FilterSettings(Settings):
    """``wsi.tile.filters``: optional QC filters; ``None`` = off."""


@settings_section("wsi", "tile")
class TileSettings(Settings):
    """``wsi.tile``: the grid, the QC filters (``filters``: FilterSettings) and how pixels
    are written."""

    @property
    def step(self) -> int:
        return self.stride or self.size
