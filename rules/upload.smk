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
