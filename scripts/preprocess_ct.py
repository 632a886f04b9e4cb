"""Rule `preprocess_ct`: a sample's DICOM files to an HU volume, lung mask, metadata and QC."""

from medprep import atomic, manifest
from medprep.ct import preprocess
from medprep.step import run_step


def main(smk):
    download = atomic.read_json(smk.input.manifest)
    series_uid = smk.params.series_uid
    if not isinstance(series_uid, str) or not series_uid.strip():
        series_uid = None  # empty or missing in the sample sheet
    result = preprocess.preprocess(
        preprocess.paths_from_download_manifest(download),
        smk.params.settings,
        series_uid=series_uid,
        include_identifiers=bool(smk.params.include_identifiers),
        threads=smk.threads,
    )
    artifacts = preprocess.write_outputs(
        result,
        volume=smk.params.volume,
        mask=smk.params.mask,
        metadata=smk.output.metadata,
        qc=smk.output.qc,
        threads=smk.threads,
    )
    manifest.write_step_manifest(
        smk.output.manifest,
        sample=smk.wildcards.sample,
        modality="ct",
        step="preprocess",
        artifacts=artifacts,
        summary=result.summary,
    )


# spawned pool workers re-run this file without `snakemake` defined: see run_step
if __name__ == "__main__":
    run_step(snakemake, main)
