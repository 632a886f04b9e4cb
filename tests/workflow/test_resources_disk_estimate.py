"""The disk a CT sample's download reserves before its outputs are known
(``medprep.workflow.resources.estimated_working_set``) covers what the sample then really holds."""

from __future__ import annotations

import os

import pytest

from medprep.common import settings as schema
from medprep.ct import steps
from medprep.demo.ct_phantom import write_chest_phantom
from medprep.workflow import resources as mw

# (rows and columns, pixel mm, slices, slice mm): the usual chest CT voxels of 512 x 512 px
# over 358 mm; and the coarse voxels of 2.5 mm pixels and 5 mm slices (the series' own
# voxels are not known before it is read)
GEOMETRIES = {"usual": (512, 0.7, 40, 2.5), "coarse": (160, 2.5, 48, 5.0)}


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def series(request, tmp_path_factory):
    rows, pixel_mm, slices, slice_mm = GEOMETRIES[request.param]
    folder = tmp_path_factory.mktemp("series") / request.param
    write_chest_phantom(
        folder, rows=rows, cols=rows, slices=slices, pixel_mm=pixel_mm, slice_mm=slice_mm
    )
    return sorted(folder.iterdir())


@pytest.mark.parametrize("spacing_mm", [1.0, 3.0])
def test_the_reservation_covers_the_working_set_at_the_output_spacing(series, tmp_path, spacing_mm):
    config = schema.config_defaults("ct")
    config["spacing"] = [spacing_mm] * 3
    pre, tiled = steps.run_chain([str(p) for p in series], tmp_path, config, sample="s")
    raw = sum(p.stat().st_size for p in series)
    artifacts = sum(os.stat(a["path"]).st_size for a in [*pre["artifacts"], *tiled["artifacts"]])
    reserved = mw.estimated_working_set("ct", {"ct": config}, raw)
    assert raw + artifacts <= reserved
    # and not wildly more: the default budget is cores + 2 of these
    assert reserved <= 2.0 * (raw + artifacts)
