"""Rule `preprocess_ct`: a sample's DICOM files to an HU volume, lung mask, metadata and QC."""

from medprep.ct.steps import run_preprocess
from medprep.workflow.runner import run_step


def main(smk):
    run_preprocess(
        smk.input.manifest,
        volume_path=smk.params.volume,
        mask_path=smk.params.mask,
        metadata_path=smk.output.metadata,
        qc_path=smk.output.qc,
        manifest_path=smk.output.manifest,
        sample=smk.wildcards.sample,
        settings=smk.params.settings,
        series_uid=smk.params.series_uid,
        include_identifiers=smk.params.include_identifiers,
        threads=smk.threads,
    )


# spawned pool workers re-run this file without `snakemake` defined: see run_step
if __name__ == "__main__":
    run_step(snakemake, main)
