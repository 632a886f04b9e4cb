"""Rule `upload`: publish a sample's artifacts, data first and manifest.json last."""

import sys

from medprep import __version__, atomic, manifest, storage
from medprep.redact import redact
from medprep.step import run_step
from medprep.storage import published as published_check


def main(smk):
    steps = [manifest.read_step_manifest(path) for path in smk.input.manifests]
    published = {
        "sample": smk.wildcards.sample,
        "modality": smk.wildcards.modality,
        "medprep": __version__,
        "steps": {step["step"]: step["summary"] for step in steps},
    }
    receipt = storage.publish(
        manifest.collect_artifacts(steps),
        smk.params.destination,
        manifest=published,
        threads=smk.threads,
        settings=smk.config["storage"],
    )
    for line in receipt.get("refused", []):
        print(f"medprep warning: {redact(line)}", file=sys.stderr)
    # what the next run compares the destination with (medprep.storage.published)
    published_check.record(
        published_check.state_path(smk.wildcards.modality, smk.wildcards.sample),
        smk.params.destination,
        int(smk.params.published_generation),
        receipt,
        smk.config["storage"],
    )
    receipt["destination"] = redact(receipt["destination"])
    receipt["manifest"] = redact(receipt["manifest"])
    atomic.write_json(smk.output.receipt, {"sample": smk.wildcards.sample, **receipt})


# spawned pool workers re-run this file without `snakemake` defined: see run_step
if __name__ == "__main__":
    run_step(snakemake, main)
