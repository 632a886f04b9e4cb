"""Rule `tile_ct`: 3D patches over the lungs, their coordinate table, optional PNG slices."""

from pathlib import Path

from medprep.ct.steps import run_tile
from medprep.workflow.runner import run_step


def main(smk):
    table = Path(smk.output.table)
    run_tile(
        smk.input.preprocess,
        # written (and listed in the manifest) only when ct.patches.materialise asks
        patches_path=smk.params.patches,
        table_path=table,
        summary_path=smk.output.summary,
        manifest_path=smk.output.manifest,
        settings=smk.params.settings,
        slices_dir=Path(smk.params.patches).parent / "slices",
        threads=smk.threads,
        # region labels: the fetched annotation file's manifest (None without one), and
        # for an LIDC XML the scan's download manifest (its DICOM headers place it)
        annotations_manifest=smk.input.get("annotations"),
        download_manifest=smk.input.get("scan"),
    )


# spawned pool workers re-run this file without `snakemake` defined: see run_step
if __name__ == "__main__":
    run_step(snakemake, main)
