"""Rule `preprocess_wsi`: resolution, level choice, tissue mask and thumbnail of one slide."""

from medprep.workflow.runner import run_step
from medprep.wsi.steps import run_preprocess


def main(smk):
    run_preprocess(
        smk.input.manifest,
        mask_path=smk.output.mask,
        thumbnail_path=smk.output.thumbnail,
        summary_path=smk.output.summary,
        manifest_path=smk.output.manifest,
        sample=smk.wildcards.sample,
        resolution=smk.params.resolution,
        tissue=smk.params.tissue,
        mpp_override=smk.params.mpp_override,
        threads=smk.threads,
        limits=smk.params.limits,
        max_read_errors=smk.params.max_read_errors,
    )


# spawned pool workers re-run this file without `snakemake` defined: see run_step
if __name__ == "__main__":
    run_step(snakemake, main)
