import sys

from snakemake.utils import min_version, validate

# The medprep package lives next to this Snakefile. Snakemake passes this process's
# sys.path on to rule scripts, so they import it too, also inside per-rule conda envs.
sys.path.insert(0, workflow.basedir)

from medprep import workflow as mw

min_version("9.0")


##### configuration and sample sheet #####


validate(config, schema="../schemas/config.schema.yaml")

mw.build_demo_if_requested(config)

samples = mw.load_samples(
    config,
    schema=workflow.source_path("../schemas/samples.schema.yaml"),
)


wildcard_constraints:
    sample=mw.SAMPLE_PATTERN,
    modality="ct|wsi",


##### helpers used by the rules #####


def sample_row(wildcards):
    return samples.loc[wildcards.sample]


def sample_uri(wildcards):
    return samples.loc[wildcards.sample, "uri"]


def source_fingerprint(wildcards):
    return mw.source_fingerprint(sample_uri(wildcards), config["storage"])


def sample_mpp(wildcards):
    return mw.optional_value(samples.loc[wildcards.sample, "mpp"])


def sample_series_uid(wildcards):
    return mw.optional_value(samples.loc[wildcards.sample, "series_uid"])


def step_manifest(step):
    """The step manifest of `step` for the sample and modality of the job's wildcards."""

    def path(wildcards):
        modality = samples.loc[wildcards.sample, "modality"]
        return f"results/{modality}/{wildcards.sample}/{step}.json"

    return path


def upload_inputs(wildcards):
    modality = samples.loc[wildcards.sample, "modality"]
    return [
        f"results/{modality}/{wildcards.sample}/preprocess.json",
        f"results/{modality}/{wildcards.sample}/tile.json",
    ]


def publish_destination(wildcards):
    return mw.join_uri(config["destination"], wildcards.modality, wildcards.sample)


def get_final_outputs():
    return [
        f"results/{row.modality}/{row.sample}/upload.json"
        for row in samples.itertuples(index=False)
    ]


##### resources (mem_mb from input sizes; see medprep/workflow.py for the formulas) #####


def mem_download(wildcards, threads, attempt):
    return mw.mem_mb("download", threads=threads, attempt=attempt)


def mem_from_download(step):
    def mem(wildcards, input, threads, attempt):
        return mw.mem_mb(
            step, download_manifest=input.manifest, threads=threads, attempt=attempt
        )

    return mem


def mem_tile_wsi(wildcards, input, threads, attempt):
    return mw.mem_mb(
        "tile_wsi",
        tile_settings=config["wsi"]["tile"],
        threads=threads,
        attempt=attempt,
    )


def mem_tile_ct(wildcards, input, threads, attempt):
    return mw.mem_mb(
        "tile_ct",
        preprocess_manifest=input.preprocess,
        threads=threads,
        attempt=attempt,
    )


def mem_upload(wildcards, threads, attempt):
    return mw.mem_mb("upload", threads=threads, attempt=attempt)
