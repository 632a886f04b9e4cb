"""Rule `upload`: publish a sample's artifacts into a new version, then switch manifest.json.

Earlier versions of the sample stay until no dataset index refers to them (the `dataset`
rule removes them: medprep.data.index.remove_superseded)."""

import logging

from medprep import __version__, storage
from medprep.common import atomic
from medprep.common.redact import redact
from medprep.storage import published as published_check
from medprep.workflow import manifest
from medprep.workflow import working_files as scratch
from medprep.workflow.runner import console_line, run_step

log = logging.getLogger("medprep.upload")


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
        # one core (the rule's threads), storage.connections requests in flight
        threads=smk.config["storage"]["connections"],
        settings=smk.config["storage"],
        superseded="keep",
    )
    for line in receipt.get("refused", []):
        console_line(f"medprep warning: {redact(line)}")
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
    remove_working_files(smk, steps)


def remove_working_files(smk, steps):
    """Published: the sample's working files go unless keep_working_files (medprep/workflow/working_files.py)."""
    download = manifest.read_step_manifest(smk.params.download)
    source = download.get("source", "")
    if scratch.keep_working_files(smk.config.get("keep_working_files"), source):
        return
    paths = scratch.working_files(
        [download, *steps],
        set(smk.params.rule_outputs),
        raw_dir=smk.params.download.removesuffix(".json") if storage.is_s3(source) else None,
    )
    freed = scratch.remove_working_files(paths)
    log.info("removed %d working files (%.1f MB) now published", len(paths), freed / 1e6)


# spawned pool workers re-run this file without `snakemake` defined: see run_step
if __name__ == "__main__":
    run_step(snakemake, main)
