"""Rule `download`: make a sample's input available locally and describe it."""

from medprep import manifest, storage
from medprep.redact import redact
from medprep.step import run_step


def main(smk):
    files = storage.fetch(
        smk.params.uri, smk.params.target_dir, threads=smk.threads, settings=smk.params.storage
    )
    total = sum(f.bytes for f in files)
    manifest.write_step_manifest(
        smk.output.manifest,
        sample=smk.wildcards.sample,
        modality=smk.wildcards.modality,
        step="download",
        source=redact(smk.params.uri),
        fingerprint=smk.params.fingerprint,
        files=[f.to_dict() for f in files],
        total_bytes=total,
        summary={"status": "ok", "warnings": [], "files": len(files), "bytes": total},
    )


run_step(snakemake, main)
