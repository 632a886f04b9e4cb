rule download:
    output:
        manifest="results/{modality}/{sample}/download.json",
    log:
        "logs/download/{modality}/{sample}.log",
    benchmark:
        "logs/benchmarks/download/{modality}/{sample}.tsv"
    retries: 1
    conda:
        "../envs/storage.yaml"
    # I/O, not CPU: one core and storage.connections requests in flight; `transfers`
    # (profiles/default) caps how many transfer jobs run at once. Holding the core is what
    # bounds the samples downloaded ahead of the CPU steps: Snakemake frees a job's
    # disk_mb when the job ends, so nothing else would (an upload, which finishes a
    # sample and frees its disk, holds none).
    threads: 1
    resources:
        mem_mb=mem_download,
        disk_mb=disk_download,
        disk_need_mb=disk_download,
        transfers=1,
        runtime="1h",
    # Connection settings (config["storage"]) are read by the script, not passed as
    # params: changing an endpoint or a profile must not rerun every sample.
    params:
        uri=sample_uri,
        target_dir=subpath(output.manifest, strip_suffix=".json"),
        # Changes when the sample's input changes (names, sizes, mtimes or ETags):
        # the rerun trigger for the whole chain of this sample, and only this sample.
        fingerprint=source_fingerprint,
    script:
        "../scripts/download.py"


# The sample's annotation file (sheet column `annotations`), fetched and fingerprinted
# like the input but on its own: a changed file reruns this job and the sample's tile
# step after it, not download or preprocess. Named tile_* so that its failure record is
# the tile step's (logs/failures/{sample}.tile.json), which the cohort table reads.
rule tile_annotations:
    output:
        manifest="results/{modality}/{sample}/annotations.json",
    log:
        "logs/tile_annotations/{modality}/{sample}.log",
    benchmark:
        "logs/benchmarks/tile_annotations/{modality}/{sample}.tsv"
    retries: 1
    conda:
        "../envs/storage.yaml"
    threads: 1
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
    script:
        "../scripts/download_annotations.py"


# ct.annotations.csv: one CSV for the cohort; a change reruns tile_ct of every CT sample
# that takes it (those without their own `annotations`), and their uploads.
rule tile_annotations_cohort:
    output:
        manifest=COHORT_ANNOTATIONS,
    log:
        "logs/tile_annotations/ct_cohort.log",
    benchmark:
        "logs/benchmarks/tile_annotations/ct_cohort.tsv"
    retries: 1
    conda:
        "../envs/storage.yaml"
    threads: 1
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
    script:
        "../scripts/download_annotations.py"
