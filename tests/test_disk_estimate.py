"""The disk a CT sample's download reserves before its outputs are known
(``medprep.workflow.raw_to_working_set``) covers what the sample then really holds."""

from __future__ import annotations

import os

import pytest

from medprep import schema
from medprep import workflow as mw
from medprep.ct import steps
from medprep.ct.phantom import write_chest_phantom


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series") / "s"
    # a chest CT's usual geometry: 512 x 512 px over 358 mm, 2.5 mm slices (the estimate
    # assumes such voxels: the series' own spacing is not known before it is read)
    write_chest_phantom(folder, rows=512, cols=512, slices=40, pixel_mm=0.7, slice_mm=2.5)
    return sorted(folder.iterdir())


@pytest.mark.parametrize("spacing_mm", [1.0, 2.0])
def test_the_reservation_covers_the_working_set_at_the_output_spacing(
    series, tmp_path, spacing_mm
):
    config = schema.config_defaults("ct")
    config["spacing"] = [spacing_mm] * 3
    pre, tiled = steps.run_chain([str(p) for p in series], tmp_path, config, sample="s")
    raw = sum(p.stat().st_size for p in series)
    artifacts = sum(os.stat(a["path"]).st_size for a in [*pre["artifacts"], *tiled["artifacts"]])
    reserved = raw * mw.raw_to_working_set("ct", {"ct": config})
    assert raw + artifacts <= reserved
    # and not wildly more: the budget admits cores + 2 samples of this estimate
    assert reserved <= 1.6 * (raw + artifacts)
