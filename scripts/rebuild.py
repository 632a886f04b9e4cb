"""Rule `rebuild`: the record that makes a step run again when the destination lost what it
made and its working files are gone (medprep.workflow.parse.publication_state)."""

from pathlib import Path

from medprep.common import atomic
from medprep.workflow.runner import run_step


def main(smk):
    record = Path(smk.output.record)
    atomic.write_json(
        record,
        {
            "sample": smk.wildcards.sample,
            "modality": smk.wildcards.modality,
            "rebuilds": smk.wildcards.step,
            "number": int(smk.wildcards.number),
            "why": "the destination lost files this step made, and their working copies "
            "were removed after upload: the step makes them again from the source",
        },
    )
    # only the newest record of a step is an input of it
    for older in record.parent.glob(f"{smk.wildcards.step}-*.json"):
        if older != record:
            older.unlink(missing_ok=True)


# spawned pool workers re-run this file without `snakemake` defined: see run_step
if __name__ == "__main__":
    run_step(snakemake, main)
