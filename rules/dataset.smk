from medprep.data import index as medprep_dataset

# sample, modality, label, patient and meta_* of every sample the run processes, in sheet order
DATASET_SAMPLES = medprep_dataset.sheet_records(RUN_SAMPLES)


# One small job over all samples: run it where Snakemake runs, not as a cluster job.
localrules:
    dataset,


# The dataset index of this run's samples ({destination}/dataset/{RUN}/), after every
# sample is published; rebuilt when a sample's table or receipt changes, or the labels,
# patients or split settings do.
rule dataset:
    input:
        receipts=medprep_dataset.step_paths(DATASET_SAMPLES, "upload"),
        tiles=medprep_dataset.step_paths(DATASET_SAMPLES, "tile"),
        preprocess=medprep_dataset.step_paths(DATASET_SAMPLES, "preprocess"),
        tables=medprep_dataset.table_paths(DATASET_SAMPLES),
    output:
        tiles=f"results/dataset/{RUN}/tiles.parquet",
        patches=f"results/dataset/{RUN}/patches.parquet",
        samples=f"results/dataset/{RUN}/samples.parquet",
        datalist=f"results/dataset/{RUN}/datalist.json",
        receipt=f"results/dataset/{RUN}/upload.json",
    log:
        f"logs/dataset/{RUN}.log",
    benchmark:
        f"logs/benchmarks/dataset/{RUN}.tsv"
    retries: 1
    conda:
        "../envs/dataset.yaml"
    threads: 2
    resources:
        mem_mb=lambda wildcards, attempt: medprep_dataset.mem_mb(attempt),
        runtime="30m",
    params:
        samples=DATASET_SAMPLES,
        splits=config["dataset"]["splits"],
        seed=config["dataset"]["seed"],
        destination=mw.join_uri(config["destination"], "dataset", RUN),
        run=RUN,
    script:
        "../scripts/dataset.py"
