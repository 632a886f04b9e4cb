import sys

from snakemake.utils import min_version, validate

# The medprep package lives next to this Snakefile. Snakemake passes this process's
# sys.path on to rule scripts, so they import it too, also inside per-rule conda envs.
sys.path.insert(0, workflow.basedir)

from medprep.workflow import code as mc
from medprep.workflow import jobs as mj
from medprep.workflow import parse as mw
from medprep.workflow import resources as mr
from medprep.workflow import step_server as ms
from medprep.workflow import transfers as mt
from medprep.workflow import working_files as scratch

min_version("9.0")


##### configuration and sample sheet #####


# A misspelt key anywhere fails here, one line per key naming it and its parent.
mw.check_config_keys(config)
validate(config, schema="../schemas/config.schema.yaml")
# The run's name (config run_name, default the sheet's file stem) scopes what belongs to
# one sheet: results/cohort/{RUN}/, results/dataset/{RUN}/, {destination}/dataset/{RUN}/.
RUN = mw.run_name(config)

# Memory guarded by default: a local run without --resources mem_mb=N gets the memory
# the machine has available; `transfers` (profiles/default) gets a default too.
mr.default_global_resources(workflow)

mw.build_demo_if_requested(config)

# A new identity for this run: a retry of a job that failed on bad input in this run
# fails at once (medprep.workflow.runner), a new run tries again.
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
# Inputs that do not exist, found before any job: one summary line, the list in
# logs/missing_inputs/{RUN}.tsv; those samples get no job, only their failure record
# (config missing_inputs: skip), or the run stops here (stop).
MISSING_SAMPLES = mw.skip_missing_inputs(
    sample_table, config, RUN, main_process=workflow.is_main_process
)
# The samples this run processes: those of the sheet whose inputs exist.
RUN_SAMPLES = {
    name: row for name, row in sample_table.items() if name not in MISSING_SAMPLES
}
# ... and those of the published samples, for the check of `upload` (see below).
mw.expect_published(RUN_SAMPLES, config)
# S3 inputs: local disk bounded by default (--resources disk_mb=N sets another budget).
mr.default_disk_budget(workflow, list(RUN_SAMPLES.values()), config)

# Transfer jobs are threads of this process handing their work to `transfers` worker
# processes (rules/download.smk); a download waits while samples_in_progress samples
# (default cores + 2) are fetched but not yet published, or their working sets fill disk_mb.
TRANSFERS = mt.Transfers.for_workflow(workflow, config)
# CPU jobs (preprocess, tile) are threads of this process too, holding their cores and
# memory: each hands its step to the step server, which forks a child per job from a
# process that keeps the steps' imports (medprep/workflow/step_server.py). In a cluster
# job, the step runs in the job's own process.
CPU_STEPS = ms.CpuSteps.for_workflow(workflow, config)


wildcard_constraints:
    sample=mw.SAMPLE_PATTERN,
    modality="ct|wsi",


##### helpers used by the rules #####


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


def rebuild_input(step):
    """{"rebuild": record} when the destination lost what `step` made and its working
    files are gone too: the step runs again from the source (rule `rebuild`)."""

    def inputs(wildcards):
        return mw.rebuild_inputs(
            config,
            sample_table[wildcards.sample]["modality"],
            wildcards.sample,
            step,
            main_process=workflow.is_main_process,
        )

    return inputs


def step_code(engine, rule):
    """The code fingerprint of a CPU step, a param that reruns it when its engine's code
    or its script changes (the script of a `run:` job is no input of it for Snakemake).
    """
    return mc.rule_code_fingerprint(engine, f"{workflow.basedir}/scripts/{rule}.py")


def get_final_outputs():
    return [
        f"results/{row['modality']}/{name}/upload.json"
        for name, row in RUN_SAMPLES.items()
    ]


##### threads of CPU jobs #####


def cpu_threads(most):
    """`most` threads, or 1 in a local run of at least as many samples as cores.

    With a job per core, samples run side by side and every job fits whatever core is
    free: a multi-thread job would wait until enough cores are free at once.
    """

    def threads(wildcards):
        return mr.cpu_job_threads(
            most,
            samples=len(sample_table),
            cores=workflow.global_resources["_cores"].value,
            on_cluster=workflow.non_local_exec,
        )

    return threads


##### resources (mem_mb from input sizes; see medprep/workflow/ for the formulas) #####


def job_mem_mb(step, threads, attempt, **inputs):
    """mem_mb of one job; on a cluster it includes the Snakemake processes running it."""
    return mr.mem_mb(
        step,
        threads=threads,
        attempt=attempt,
        on_cluster=workflow.non_local_exec,
        **inputs,
    )


def mem_download(wildcards, threads, attempt):
    return job_mem_mb(
        "download", threads, attempt, connections=config["storage"]["connections"]
    )


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
        connections=config["storage"]["connections"],
    )


##### local disk (disk_mb: what the sample holds in results/ while the job runs) #####


def disk_download(wildcards):
    return mr.disk_mb(
        "download",
        uri=sample_uri(wildcards),
        modality=wildcards.modality,
        config=config,
    )


def disk_preprocess_ct(wildcards, input):
    return mr.disk_mb(
        "preprocess_ct",
        download_manifest=input.manifest,
        config=config,
    )


def disk_preprocess_wsi(wildcards, input):
    return mr.disk_mb(
        "preprocess_wsi",
        download_manifest=input.manifest,
        config=config,
    )


def disk_tile_ct(wildcards, input):
    return mr.disk_mb(
        "tile_ct",
        download_manifest=step_manifest("download")(wildcards),
        preprocess_manifest=input.preprocess,
        patch_settings=config["ct"]["patches"],
    )


def disk_tile_wsi(wildcards, input):
    return mr.disk_mb(
        "tile_wsi",
        download_manifest=input.download,
        preprocess_manifest=input.preprocess,
        tile_settings=config["wsi"]["tile"],
    )


def disk_upload(wildcards, input):
    return mr.disk_mb(
        "upload",
        download_manifest=step_manifest("download")(wildcards),
        step_manifests=list(input.manifests),
        destination=config["destination"],
    )


def sample_rule_outputs(wildcards):
    """Outputs of the sample's steps (they stay when working files go)."""
    steps = (
        (rules.preprocess_ct, rules.tile_ct)
        if wildcards.modality == "ct"
        else (rules.preprocess_wsi, rules.tile_wsi)
    )
    return [
        path.format(sample=wildcards.sample) for step in steps for path in step.output
    ]


##### region labels (sheet column `annotations`, config ct.annotations.csv) #####

# One CSV for every CT sample (ct.annotations.csv): fetched once, here.
COHORT_ANNOTATIONS = "results/annotations/ct_cohort.json"


def sample_annotations(wildcards):
    """{} or {"annotations": the manifest of the sample's fetched annotation file}.

    The sheet's `annotations` column wins; a CT sample without one takes the cohort CSV
    of ct.annotations.csv when it is set. Rule scripts read input.get("annotations").
    """
    row = sample_table[wildcards.sample]
    if row.get("annotations"):
        return {
            "annotations": f"results/{row['modality']}/{wildcards.sample}/annotations.json"
        }
    if row["modality"] == "ct" and (config["ct"].get("annotations") or {}).get("csv"):
        return {"annotations": COHORT_ANNOTATIONS}
    return {}


def lidc_scan(wildcards):
    """tile_ct of an LIDC XML reads the scan's DICOM headers: its download manifest."""
    if (
        str(sample_table[wildcards.sample].get("annotations") or "")
        .lower()
        .endswith(".xml")
    ):
        return {"scan": f"results/ct/{wildcards.sample}/download.json"}
    return {}


def annotations_uri(wildcards):
    return sample_table[wildcards.sample]["annotations"]


def annotations_fingerprint(wildcards):
    # never raises: an error becomes a marker that fails this sample's annotations job
    return mw.source_fingerprint(
        annotations_uri(wildcards), config["storage"], sample=wildcards.sample
    )


def cohort_annotations_uri(wildcards):
    return config["ct"]["annotations"]["csv"]


def cohort_annotations_fingerprint(wildcards):
    return mw.source_fingerprint(
        cohort_annotations_uri(wildcards), config["storage"], sample="(cohort)"
    )
