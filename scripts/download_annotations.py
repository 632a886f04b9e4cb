"""Rules `tile_annotations(_cohort)`: fetch an annotation file and describe it."""

from medprep import storage
from medprep.common.errors import InputError, undefer
from medprep.common.redact import redact
from medprep.workflow import manifest
from medprep.workflow.runner import run_step


def main(smk):
    # an error met while the DAG was built (e.g. an unreadable path)
    deferred = undefer(smk.params.fingerprint)
    if deferred is not None:
        raise deferred
    settings = smk.config["storage"]
    files = storage.fetch(smk.params.uri, smk.params.target_dir, threads=1, settings=settings)
    if len(files) != 1:
        raise InputError(
            f"an annotation source must be one file, not {len(files)}", path=smk.params.uri
        )
    wildcards = dict(smk.wildcards.items())
    manifest.write_annotations_manifest(
        smk.output.manifest,
        sample=wildcards.get("sample", "(cohort)"),
        modality=wildcards.get("modality", "ct"),
        source=redact(smk.params.uri),
        files=[f.to_dict() for f in files],
        fingerprint=storage.files_fingerprint(files),
        scope=smk.params.scope,
    )


if __name__ == "__main__":
    run_step(snakemake, main)
