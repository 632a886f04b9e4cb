rule upload:
    input:
        manifests=upload_inputs,
    output:
        receipt="results/{modality}/{sample}/upload.json",
    log:
        "logs/upload/{modality}/{sample}.log",
    # Finishing a started sample (and freeing its working files) comes before new work.
    priority: 3
    retries: 1
    # I/O, not CPU, and it frees the sample's disk: no core, and no `transfers` slot
    # (a download waiting for run-ahead room holds one; uploads are what make the room).
    # At most samples_in_progress samples await upload; the transfer workers
    # (`transfers` of them) run the uploads and downloads.
    threads: 0
    resources:
        mem_mb=mem_upload,
        disk_mb=disk_upload,
        disk_need_mb=disk_upload,
        runtime="1h",
    params:
        destination=publish_destination,
        published_generation=published_generation,
        # what stays in results/ when working files are removed (medprep/workflow/working_files.py);
        # config["keep_working_files"] is read by the step: changing it reruns nothing
        rule_outputs=sample_rule_outputs,
        download="results/{modality}/{sample}/download.json",
    run:
        TRANSFERS.upload(input, output, params, wildcards, resources, log, rule)


# One small job: run it where Snakemake runs, not as a cluster job.
localrules:
    rebuild,


# The destination lost what a step made (volume, mask, patches, tile shards) and its
# working files were removed after upload: this record is an input of that step, so that
# it runs again and fetches the source (medprep.workflow.parse.publication_state). A few
# bytes of JSON: written by a thread of the Snakemake process, as transfers are.
rule rebuild:
    output:
        record="results/{modality}/{sample}/rebuild/{step}-{number}.json",
    log:
        "logs/rebuild/{modality}/{sample}.{step}-{number}.log",
    wildcard_constraints:
        step="preprocess|tile",
        number=r"\d+",
    threads: 0
    resources:
        mem_mb=mr.SMALL_JOB_MB,
        disk_mb=mr.SMALL_OUTPUTS_MB,
        runtime="5m",
    run:
        scratch.write_rebuild_record(output.record, wildcards, log[0])
