# medprep: preprocessing of lung CT series and whole-slide images for deep learning.
#
#   download -> preprocess_{ct,wsi} -> tile_{ct,wsi} -> upload   (one chain per sample)
#   -> cohort (table and plot of all samples; `snakemake --report report.html`)
#   -> dataset (the index of every tile and patch, with splits: {destination}/dataset/)
#
# Run: snakemake --cores all   (see README.md; cluster: --profile profiles/slurm)


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/preprocess.smk"
include: "rules/tile.smk"
include: "rules/upload.smk"
include: "rules/report.smk"
include: "rules/dataset.smk"


# `snakemake --report report.html`: this text, the QC pictures and the cohort table
report: "report/workflow.rst"


rule all:
    default_target: True
    input:
        get_final_outputs(),
        rules.cohort.output,
        rules.dataset.output,


# The cohort summary (counts by status, one line per sample or per problem) ends every run;
# the scheduler's leftover timers are cancelled so that the process ends at once.
onsuccess:
    medprep_cohort.print_summary(COHORT_OUTPUTS)
    mj.end_of_run()


# Before the first job: transfer jobs that would each start a whole Snakemake process
# (no --force-use-threads) and a destination that cannot be published to stop the run in
# one line (a dry-run writes no probe); the step server starts and imports what the CPU
# steps use while the first downloads run.
onstart:
    TRANSFERS.on_start(workflow)
    mw.check_destination_or_exit(config)
    CPU_STEPS.on_start(workflow, {row["modality"] for row in RUN_SAMPLES.values()})


# With failed samples the `cohort` rule cannot run: write the table with their causes here.
onerror:
    medprep_cohort.write_after_failure(COHORT_SAMPLES, COHORT_OUTPUTS, COHORT_SHEET)
    mj.end_of_run()
