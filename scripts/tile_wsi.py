"""Rule `tile_wsi`: tiles of one slide where it has tissue, with QC scores and a table."""

from medprep.workflow.runner import run_step
from medprep.wsi.steps import run_tile


def main(smk):
    run_tile(
        smk.input.download,
        smk.input.preprocess,
        table_path=smk.output.table,
        overlay_path=smk.output.overlay,
        summary_path=smk.output.summary,
        manifest_path=smk.output.manifest,
        sample=smk.wildcards.sample,
        tile=smk.params.tile,
        threads=smk.threads,
        annotations_manifest=smk.input.get("annotations"),
        patches_path=smk.output.patches,
    )


# spawned pool workers re-run this file without `snakemake` defined: see run_step
if __name__ == "__main__":
    run_step(snakemake, main)
