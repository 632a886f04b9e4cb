from medprep.cohort import table as medprep_cohort
from medprep.data import index as medprep_dataset

# This run's cohort (results/cohort/{RUN}/); `--report` of a run without one stops here.
COHORT_OUTPUTS = mw.cohort_outputs(RUN)
mw.check_report_inputs(RUN, COHORT_OUTPUTS)
# The QC picture of each modality: its path, its report category and its caption (the
# caption resolved here, as Snakemake does for report() in a rule's own input or output).
QC_PICTURES = {
    "wsi": medprep_cohort.QcPicture(
        "results/wsi/{sample}/tiles/overlay.png",
        "Slides",
        workflow.current_basedir.join("../report/slide_overlay.rst"),
    ),
    "ct": medprep_cohort.QcPicture(
        "results/ct/{sample}/preprocess/qc.png",
        "CT scans",
        workflow.current_basedir.join("../report/ct_qc.rst"),
    ),
}
# (sample, modality) of every sample, in sheet order
COHORT_SAMPLES = [(row.sample, row.modality) for row in samples.itertuples(index=False)]
# label, patient and meta_* of each sample: extra columns of the cohort table
COHORT_SHEET = {
    record["sample"]: {
        k: v for k, v in record.items() if k not in ("sample", "modality")
    }
    for record in medprep_dataset.sheet_records(sample_table)
}


# One small job over all samples: run it where Snakemake runs, not as a cluster job.
localrules:
    cohort,


rule cohort:
    input:
        receipts=get_final_outputs(),
        # each sample's QC picture, registered for the report when it exists (see
        # medprep.cohort.table.qc_pictures)
        pictures=lambda wildcards: medprep_cohort.qc_pictures(
            [s for s in COHORT_SAMPLES if s[0] in RUN_SAMPLES], QC_PICTURES, report
        ),
    output:
        table=report(
            COHORT_OUTPUTS["table"],
            caption="../report/cohort_table.rst",
            category="Cohort",
            labels={"view": "cohort table (CSV)"},
        ),
        html=report(
            COHORT_OUTPUTS["html"],
            caption="../report/cohort_table.rst",
            category="Cohort",
            labels={"view": "cohort table"},
        ),
        plot=report(
            COHORT_OUTPUTS["plot"],
            caption="../report/cohort_plot.rst",
            category="Cohort",
            labels={"view": "cohort plot"},
        ),
    log:
        f"logs/cohort/{RUN}.log",
    benchmark:
        f"logs/benchmarks/cohort/{RUN}.tsv"
    conda:
        "../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: medprep_cohort.mem_mb(
            len(COHORT_SAMPLES), attempt
        ),
        runtime="10m",
    params:
        samples=COHORT_SAMPLES,
        sheet=COHORT_SHEET,
    script:
        "../scripts/cohort.py"
