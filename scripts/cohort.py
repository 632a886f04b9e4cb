"""Rule `cohort`: the cohort table (CSV and HTML) and the cohort plot of every sample."""

import logging

from medprep.cohort import table as cohort
from medprep.workflow.runner import run_step

log = logging.getLogger("medprep.cohort.table")


def main(smk):
    rows = cohort.write_cohort(
        [tuple(pair) for pair in smk.params.samples],
        table=smk.output.table,
        html=smk.output.html,
        plot=smk.output.plot,
        sheet=smk.params.sheet,
    )
    for line in cohort.text_summary(rows).splitlines():
        log.info("%s", line)


# spawned pool workers re-run this file without `snakemake` defined: see run_step
if __name__ == "__main__":
    run_step(snakemake, main)
