# Transfer rules run as threads of the Snakemake process, which hand the work to its warm
# transfer workers (medprep/workflow/transfers.py): no process per job, no core held.
# On a cluster too, they run in the Snakemake process (on the node where it runs) and
# not as cluster jobs: compute nodes need no network, and no job waits in the queue.
# They have no `benchmark:`: Snakemake's record of a job run in its own process measures
# that whole process and its children (every job running), sampling them every 0.5 s
# from the Snakemake process; each job's log gives its time, CPU and peak memory instead.
localrules:
    download,
    upload,
    download_annotations,
    download_annotations_cohort,


rule download:
    output:
        manifest="results/{modality}/{sample}/download.json",
    log:
        "logs/download/{modality}/{sample}.log",
    retries: 1
    # I/O, not CPU: no core; storage.connections requests in flight in a transfer worker,
    # at most `transfers` (profiles/default) downloads at once. The samples downloaded
    # ahead of the CPU steps are bounded by the download itself: it waits until fewer
    # than `samples_in_progress` samples are fetched but not yet published and their
    # working sets (disk_need_mb) fit in disk_mb (medprep/workflow/transfers.py).
    threads: 0
    resources:
        mem_mb=mem_download,
        disk_need_mb=disk_download,
        transfers=1,
        runtime="1h",
    # Connection settings (config["storage"]) are read by the step, not passed as
    # params: changing an endpoint or a profile must not rerun every sample.
    params:
        uri=sample_uri,
        target_dir=subpath(output.manifest, strip_suffix=".json"),
        # Changes when the sample's input changes (names, sizes, mtimes or ETags):
        # the rerun trigger for the whole chain of this sample, and only this sample.
        fingerprint=source_fingerprint,
    run:
        TRANSFERS.download(input, output, params, wildcards, resources, log, rule)


# The sample's annotation file (sheet column `annotations`), fetched and fingerprinted
# like the input but on its own: a changed file reruns this job and the sample's tile
# step after it, not download or preprocess. Its failure record is the tile step's
# (logs/failures/{sample}.tile.json: medprep.workflow.runner.RULE_STEPS), the step it
# keeps from running.
rule download_annotations:
    output:
        manifest="results/{modality}/{sample}/annotations.json",
    log:
        "logs/download_annotations/{modality}/{sample}.log",
    retries: 1
    threads: 0
    resources:
        mem_mb=mem_download,
        disk_mb=mr.SMALL_OUTPUTS_MB,
        transfers=1,
        runtime="10m",
    params:
        uri=annotations_uri,
        scope="sample",
        target_dir=subpath(output.manifest, strip_suffix=".json"),
        fingerprint=annotations_fingerprint,
    run:
        TRANSFERS.annotations(input, output, params, wildcards, resources, log, rule)


# ct.annotations.csv: one CSV for the cohort; a change reruns tile_ct of every CT sample
# that takes it (those without their own `annotations`), and their uploads.
rule download_annotations_cohort:
    output:
        manifest=COHORT_ANNOTATIONS,
    log:
        "logs/download_annotations/ct_cohort.log",
    retries: 1
    threads: 0
    resources:
        mem_mb=mem_download,
        disk_mb=mr.SMALL_OUTPUTS_MB,
        transfers=1,
        runtime="10m",
    params:
        uri=cohort_annotations_uri,
        scope="cohort",
        target_dir=subpath(output.manifest, strip_suffix=".json"),
        fingerprint=cohort_annotations_fingerprint,
    run:
        TRANSFERS.annotations(input, output, params, wildcards, resources, log, rule)
