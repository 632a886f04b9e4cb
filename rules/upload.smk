rule upload:
    input:
        manifests=upload_inputs,
    output:
        receipt="results/{modality}/{sample}/upload.json",
    log:
        "logs/upload/{modality}/{sample}.log",
    benchmark:
        "logs/benchmarks/upload/{modality}/{sample}.tsv"
    # Finishing a started sample (and freeing its working files) comes before new work.
    priority: 3
    retries: 1
    conda:
        "../envs/storage.yaml"
    # I/O, not CPU, and it frees the sample's disk: it holds no core of --cores, so it
    # never waits for one; on a cluster it asks for one CPU (SLURM has no zero-CPU job).
    threads: 0
    resources:
        cpus_per_task=1,
        mem_mb=mem_upload,
        disk_mb=disk_upload,
        disk_need_mb=disk_upload,
        transfers=1,
        runtime="1h",
    params:
        destination=publish_destination,
        published_generation=published_generation,
        # what stays in results/ when working files are removed (medprep/workflow/working_files.py);
        # config["keep_working_files"] is read by the script: changing it reruns nothing
        rule_outputs=sample_rule_outputs,
        download="results/{modality}/{sample}/download.json",
    script:
        "../scripts/upload.py"


# One small job: run it where Snakemake runs, not as a cluster job.
localrules:
    rebuild,


# The destination lost what a step made (volume, mask, patches, tile shards) and its
# working files were removed after upload: this record is an input of that step, so that
# it runs again and fetches the source (medprep.workflow.parse.publication_state).
rule rebuild:
    output:
        record="results/{modality}/{sample}/rebuild/{step}-{number}.json",
    log:
        "logs/rebuild/{modality}/{sample}.{step}-{number}.log",
    benchmark:
        "logs/benchmarks/rebuild/{modality}/{sample}.{step}-{number}.tsv"
    wildcard_constraints:
        step="preprocess|tile",
        number=r"\d+",
    conda:
        "../envs/storage.yaml"
    threads: 1
    resources:
        mem_mb=mr.SMALL_JOB_MB,
        disk_mb=mr.SMALL_OUTPUTS_MB,
        runtime="5m",
    script:
        "../scripts/rebuild.py"
