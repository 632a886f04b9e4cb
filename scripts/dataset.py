"""Rule `dataset`: the index of every tile and patch, published to {destination}/dataset/{run}/;
then the earlier versions of its samples that no index refers to any more are removed."""

import os

from medprep import __version__
from medprep.common import atomic
from medprep.data import index as dataset
from medprep.workflow.runner import run_step


def main(smk):
    entries = dataset.entries_from_records(
        smk.params.samples, smk.input.tiles, smk.input.preprocess, smk.input.receipts
    )
    manifest = dataset.build(
        entries,
        os.path.dirname(smk.output.tiles),
        fractions=dict(smk.params.splits),
        seed=smk.params.seed,
        threads=smk.threads,
    )
    receipt = dataset.publish(
        {
            "tiles.parquet": smk.output.tiles,
            "patches.parquet": smk.output.patches,
            "samples.parquet": smk.output.samples,
            "datalist.json": smk.output.datalist,
        },
        smk.params.destination,
        {**manifest, "run": smk.params.run, "medprep": __version__},
        threads=smk.threads,
        settings=smk.config["storage"],
    )
    receipt["superseded_samples"] = dataset.remove_superseded(
        entries,
        smk.config["destination"],
        threads=smk.config["storage"]["connections"],
        settings=smk.config["storage"],
    )
    atomic.write_json(smk.output.receipt, receipt)


# spawned pool workers re-run this file without `snakemake` defined: see run_step
if __name__ == "__main__":
    run_step(snakemake, main)
