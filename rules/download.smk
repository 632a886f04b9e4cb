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
    # I/O, not CPU: the job holds no core of --cores (threads 0) and keeps
    # storage.connections requests in flight; `transfers` (profiles/default) caps how
    # many transfer jobs run at once, so CPU jobs keep every core. On a cluster the job
    # asks for one CPU (cpus_per_task: SLURM has no zero-CPU job).
    threads: 0
    resources:
        cpus_per_task=1,
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
