"""One CPU step of the cohort benchmark, run three times in this fresh process.

Prints the CPU seconds of the first run counted from the process's start (what every
workflow job pays: the interpreter, the step's imports, the first use of its memory) and
of the fastest later run (what a warm pool worker pays). Imports only what the rule's
script imports, so that the first run costs what a workflow job costs:

    python benchmarks/cohort_step.py STEP SOURCE OUT SETTINGS_JSON [MODULES]

With MODULES (a file naming modules, one a line): import them, then run the step in a
child forked from this process, three times, and print the CPU seconds of the child
(what a job forked by a server holding those imports would cost).

STEP: preprocess_ct (SOURCE: a DICOM series folder), tile_ct (SOURCE: a preprocess.json),
preprocess_wsi (SOURCE: a folder with download.json) or tile_wsi (SOURCE: a folder with
download.json and preprocess.json).
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
from pathlib import Path


def run(step: str, source: Path, folder: Path, settings: dict) -> None:
    if step == "preprocess_ct":
        from medprep.ct import steps

        steps.run_preprocess(
            sorted(str(p) for p in source.iterdir()),
            volume_path=folder / "preprocess/volume.nii.gz",
            mask_path=folder / "preprocess/lung_mask.nii.gz",
            metadata_path=folder / "preprocess/metadata.json",
            qc_path=folder / "preprocess/qc.png",
            manifest_path=folder / "preprocess.json",
            sample="s",
            settings=settings["ct"],
        )
    elif step == "tile_ct":
        from medprep.ct import steps

        steps.run_tile(
            source,
            patches_path=folder / "patches/patches.npy",
            table_path=folder / "patches/patches.parquet",
            summary_path=folder / "patches/summary.json",
            manifest_path=folder / "tile.json",
            settings=settings["ct"],
        )
    else:
        folder.mkdir(parents=True)
        for name in ("download.json", "preprocess.json"):
            if (source / name).is_file():
                shutil.copy(source / name, folder / name)
        run_wsi(step, folder, settings)


def run_wsi(step: str, folder: Path, settings: dict) -> dict:
    """One WSI step with the workflow's file layout under ``folder`` (which holds the
    sample's download.json, and preprocess.json for tile_wsi)."""
    from medprep.wsi import steps

    sample, download = folder.name, folder / "download.json"
    if step == "preprocess_wsi":
        return steps.run_preprocess(
            download,
            mask_path=folder / "preprocess" / "mask.png",
            thumbnail_path=folder / "preprocess" / "thumbnail.png",
            summary_path=folder / "preprocess" / "summary.json",
            manifest_path=folder / "preprocess.json",
            sample=sample,
            resolution=settings["wsi"]["resolution"],
            tissue=settings["wsi"]["tissue"],
            limits=settings["wsi"]["limits"],
        )
    return steps.run_tile(
        download,
        folder / "preprocess.json",
        table_path=folder / "tiles" / "tiles.parquet",
        overlay_path=folder / "tiles" / "overlay.png",
        summary_path=folder / "tiles" / "summary.json",
        manifest_path=folder / "tile.json",
        sample=sample,
        tile=settings["wsi"]["tile"],
    )


def main(argv: list[str]) -> None:
    from medprep.common import settings as schema

    step, source, out, settings, *preload = argv
    settings = json.loads(Path(settings).read_text())
    with schema.config_validated():  # as in a workflow job (medprep.workflow.runner)
        if preload:
            forked_cpu = forked(step, Path(source), Path(out), settings, preload[0])
            print(json.dumps({"forked": forked_cpu}))
            return
        times: list[float] = []
        for round_ in range(3):
            run(step, Path(source), Path(out) / f"r{round_}" / "s", settings)
            times.append(cpu() - sum(times))
    print(json.dumps({"cold": times[0], "warm": min(times[1:])}))


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def forked(step: str, source: Path, out: Path, settings: dict, modules: str) -> float:
    """The fastest of three runs of ``step``, each in a child forked from this process
    after it imported ``modules``: the child's CPU seconds."""
    import contextlib
    import importlib
    import os

    for name in Path(modules).read_text().split():
        # a module that imports only as part of its package is imported with it
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    times = []
    for round_ in range(3):
        read, write = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(read)
            run(step, source, out / f"r{round_}" / "s", settings)
            os.write(write, str(cpu()).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as result:
            times.append(float(result.read()))
        os.waitpid(child, 0)
    return min(times)


if __name__ == "__main__":
    main(sys.argv[1:])
