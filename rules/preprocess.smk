# CPU rules (here and in tile.smk) are `run:` jobs: threads of the Snakemake process that
# hold the rule's threads and memory while the step runs in a child forked by the step
# server (medprep/workflow/step_server.py), from scripts/{rule}.py's main(). They run in
# the project's environment (`make setup`), not in per-rule conda environments (a `run:`
# job has none). No `benchmark:`: Snakemake's record of a job run in its own process
# would measure that whole process; the step server writes logs/benchmarks/{rule}/
# {sample}.tsv in Snakemake's format from the child's resource usage.
rule preprocess_wsi:
    input:
        manifest="results/wsi/{sample}/download.json",
    output:
        mask="results/wsi/{sample}/preprocess/mask.png",
        thumbnail="results/wsi/{sample}/preprocess/thumbnail.png",
        summary="results/wsi/{sample}/preprocess/summary.json",
        manifest="results/wsi/{sample}/preprocess.json",
    log:
        "logs/preprocess_wsi/{sample}.log",
    priority: 1
    retries: 2
    threads: 1
    resources:
        mem_mb=mem_preprocess_wsi,
        disk_mb=disk_preprocess_wsi,
        disk_need_mb=disk_preprocess_wsi,
        runtime="30m",
    params:
        resolution=config["wsi"]["resolution"],
        tissue=config["wsi"]["tissue"],
        limits=config["wsi"]["limits"],
        max_read_errors=config["wsi"]["tile"]["max_read_errors"],
        mpp_override=sample_mpp,
        engine=step_code("wsi", "preprocess_wsi"),
    run:
        CPU_STEPS.run(rule, input, output, params, wildcards, threads, resources, log)


rule preprocess_ct:
    input:
        unpack(rebuild_input("preprocess")),
        manifest="results/ct/{sample}/download.json",
    # The volume and the lung mask are working files (params, listed in the manifest),
    # not outputs: removed after upload for s3:// inputs (see medprep/workflow/working_files.py).
    output:
        metadata="results/ct/{sample}/preprocess/metadata.json",
        qc="results/ct/{sample}/preprocess/qc.png",
        manifest="results/ct/{sample}/preprocess.json",
    log:
        "logs/preprocess_ct/{sample}.log",
    priority: 1
    retries: 2
    threads: cpu_threads(2)
    resources:
        mem_mb=mem_preprocess_ct,
        disk_mb=disk_preprocess_ct,
        disk_need_mb=disk_preprocess_ct,
        runtime="30m",
    params:
        volume="results/ct/{sample}/preprocess/volume.nii.gz",
        mask="results/ct/{sample}/preprocess/lung_mask.nii.gz",
        settings=mw.settings_without(
            config["ct"], "patches", "slices_png", "annotations"
        ),
        series_uid=sample_series_uid,
        include_identifiers=config["include_identifiers"],
        engine=step_code("ct", "preprocess_ct"),
    run:
        CPU_STEPS.run(rule, input, output, params, wildcards, threads, resources, log)
