"""Rule `tile_ct`: 3D patches over the lungs, their coordinate table, optional PNG slices."""

from pathlib import Path

from medprep import manifest
from medprep.ct import tile
from medprep.step import run_step


def main(smk):
    preprocess = manifest.read_step_manifest(smk.input.preprocess)
    artifacts, summary = tile.tile(
        preprocess,
        smk.params.settings,
        patches_path=smk.params.patches,
        table_path=smk.output.table,
        summary_path=smk.output.summary,
        slices_dir=Path(smk.params.patches).parent / "slices",
        threads=smk.threads,
    )
    manifest.write_step_manifest(
        smk.output.manifest,
        sample=preprocess["sample"],
        modality="ct",
        step="tile",
        artifacts=artifacts,
        summary=summary,
    )


# spawned pool workers re-run this file without `snakemake` defined: see run_step
if __name__ == "__main__":
    run_step(snakemake, main)
