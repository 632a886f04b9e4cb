"""Rule `tile_ct`: 3D patches over the lungs, their coordinate table, optional PNG slices."""

from medprep.ct.steps import run_tile
from medprep.step import run_step


def main(smk):
    run_tile(
        smk.input.preprocess,
        patches_path=smk.output.patches,
        table_path=smk.output.table,
        summary_path=smk.output.summary,
        manifest_path=smk.output.manifest,
        settings=smk.params.settings,
        threads=smk.threads,
    )


# spawned pool workers re-run this file without `snakemake` defined: see run_step
if __name__ == "__main__":
    run_step(snakemake, main)
