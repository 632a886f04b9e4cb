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
    # I/O, not CPU: one core, storage.connections requests in flight, `transfers` caps
    # how many transfer jobs run at once (profiles/default).
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
