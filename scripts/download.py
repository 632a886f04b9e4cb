"""Rule `download`: make a sample's input available locally and describe it."""

import logging

from medprep import storage
from medprep.common import statuses
from medprep.common.errors import undefer
from medprep.common.redact import redact
from medprep.workflow import manifest
from medprep.workflow.runner import run_step

log = logging.getLogger("medprep.download")


def main(smk):
    # an error met while the DAG was built (e.g. a symbolic link loop in the folder)
    deferred = undefer(smk.params.fingerprint)
    if deferred is not None:
        raise deferred
    settings = smk.config["storage"]
    # one core (the rule's threads), storage.connections requests in flight
    files = storage.fetch(
        smk.params.uri, smk.params.target_dir, threads=settings["connections"], settings=settings
    )
    fingerprint = storage.files_fingerprint(files)
    if fingerprint != smk.params.fingerprint:
        # The input changed between DAG build and now: what was downloaded is recorded,
        # and the next run sees a new fingerprint and reruns this sample once more.
        log.warning("input changed since the workflow started; recorded what was downloaded")
    total = sum(f.bytes for f in files)
    manifest.write_step_manifest(
        smk.output.manifest,
        sample=smk.wildcards.sample,
        modality=smk.wildcards.modality,
        step="download",
        source=redact(smk.params.uri),
        fingerprint=fingerprint,
        files=[f.to_dict() for f in files],
        total_bytes=total,
        summary={"status": statuses.OK, "warnings": [], "files": len(files), "bytes": total},
    )


# spawned pool workers re-run this file without `snakemake` defined: see run_step
if __name__ == "__main__":
    run_step(snakemake, main)
