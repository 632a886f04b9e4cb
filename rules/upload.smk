rule upload:
    input:
        manifests=upload_inputs,
    output:
        receipt="results/{modality}/{sample}/upload.json",
    log:
        "logs/upload/{modality}/{sample}.log",
    benchmark:
        "logs/benchmarks/upload/{modality}/{sample}.tsv"
    retries: 1
    conda:
        "../envs/storage.yaml"
    threads: 4
    resources:
        mem_mb=mem_upload,
        runtime="1h",
    params:
        destination=publish_destination,
        published_generation=published_generation,
    script:
        "../scripts/upload.py"
