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

# A new identity for this run: a retry of a job that failed on bad input in this run
# fails at once (medprep.step), a new run tries again.
if workflow.is_main_process:
    mw.start_run()

samples = mw.load_samples(
    config,
    schema=workflow.source_path("../schemas/samples.schema.yaml"),
)
samples = mw.with_discovered(samples, config, main_process=workflow.is_main_process)
# The rows as plain dicts for the input functions (fast at thousands of samples).
sample_table = mw.sample_records(samples)
# No I/O: fingerprints of S3 samples then come from one listing per parent prefix.
mw.storage.expect_sources(
    [row["uri"] for row in sample_table.values()], config["storage"]
)
# ... and those of the published samples, for the check of `upload` (see below).
mw.expect_published(sample_table, config)


wildcard_constraints:
    sample=mw.SAMPLE_PATTERN,
    modality="ct|wsi",


##### helpers used by the rules #####


def sample_row(wildcards):
    return sample_table[wildcards.sample]


def sample_uri(wildcards):
    return sample_table[wildcards.sample]["uri"]


def source_fingerprint(wildcards):
    # never raises: an error becomes a marker that fails this sample's download alone
    return mw.source_fingerprint(
        sample_uri(wildcards), config["storage"], sample=wildcards.sample
    )


def sample_mpp(wildcards):
    return sample_table[wildcards.sample]["mpp"]


def sample_series_uid(wildcards):
    return sample_table[wildcards.sample]["series_uid"]


def step_manifest(step):
    """The step manifest of `step` for the sample and modality of the job's wildcards."""

    def path(wildcards):
        modality = sample_table[wildcards.sample]["modality"]
        return f"results/{modality}/{wildcards.sample}/{step}.json"

    return path


def upload_inputs(wildcards):
    return [
        f"results/{wildcards.modality}/{wildcards.sample}/preprocess.json",
        f"results/{wildcards.modality}/{wildcards.sample}/tile.json",
    ]


def publish_destination(wildcards):
    return mw.join_uri(config["destination"], wildcards.modality, wildcards.sample)


def published_generation(wildcards):
    """Changes when a published file of the sample went missing or changed: rerun upload."""
    return mw.published_generation(
        config,
        wildcards.modality,
        wildcards.sample,
        main_process=workflow.is_main_process,
    )


def get_final_outputs():
    return [
        f"results/{row.modality}/{row.sample}/upload.json"
        for row in samples.itertuples(index=False)
    ]


##### resources (mem_mb from input sizes; see medprep/workflow.py for the formulas) #####


def job_mem_mb(step, threads, attempt, **inputs):
    """mem_mb of one job; on a cluster it includes the Snakemake processes running it."""
    return mw.mem_mb(
        step,
        threads=threads,
        attempt=attempt,
        on_cluster=workflow.non_local_exec,
        **inputs,
    )


def mem_download(wildcards, threads, attempt):
    return job_mem_mb("download", threads, attempt)


def mem_preprocess_ct(wildcards, input, threads, attempt):
    return job_mem_mb(
        "preprocess_ct",
        threads,
        attempt,
        download_manifest=input.manifest,
        spacing_out=config["ct"]["spacing"],
    )


def mem_preprocess_wsi(wildcards, input, threads, attempt):
    return job_mem_mb(
        "preprocess_wsi",
        threads,
        attempt,
        download_manifest=input.manifest,
        mask_mpp=config["wsi"]["tissue"]["mask_mpp"],
    )


def mem_tile_wsi(wildcards, input, threads, attempt):
    return job_mem_mb(
        "tile_wsi",
        threads,
        attempt,
        preprocess_manifest=input.preprocess,
        tile_settings=config["wsi"]["tile"],
    )


def mem_tile_ct(wildcards, input, threads, attempt):
    return job_mem_mb("tile_ct", threads, attempt, preprocess_manifest=input.preprocess)


def mem_upload(wildcards, threads, attempt):
    return job_mem_mb(
        "upload",
        threads,
        attempt,
        destination=config["destination"],
        part_size_mb=config["storage"]["part_size_mb"],
    )
