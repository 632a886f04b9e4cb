"""Thousands of samples: the workflow plans a 2,000-sample run (how fast: benchmarks/bench_dag.py)."""

from __future__ import annotations

import importlib.util
import re
from collections import Counter

import pytest
import yaml
from workflow_support import REPO, run_snakemake

pytestmark = pytest.mark.slow

SAMPLES = 2000


def load_bench_dag():
    spec = importlib.util.spec_from_file_location("bench_dag", REPO / "benchmarks" / "bench_dag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_of_2000_samples_plans_every_chain(tmp_path):
    bench_dag = load_bench_dag()
    rows = bench_dag.sample_rows(SAMPLES)
    bench_dag.write_dataset(tmp_path, SAMPLES)

    run = run_snakemake(tmp_path, "--dry-run", "--quiet", "rules", timeout=600)

    modalities = Counter(modality for _, modality, _ in rows)
    assert modalities["ct"] > 0 and modalities["wsi"] > 0
    stats = bench_dag.job_stats(run.stdout + run.stderr)
    per_sample = {rule: n for rule, n in stats.items() if rule != "total" and n != 1}
    assert per_sample == {
        "download": SAMPLES,
        "upload": SAMPLES,
        **{f"{step}_{m}": n for m, n in modalities.items() for step in ("preprocess", "tile")},
    }
    run_wide = {rule for rule, n in stats.items() if n == 1}
    assert "all" in run_wide
    assert stats["total"] == SAMPLES * 4 + len(run_wide)


def commented_bundling_settings() -> dict[str, list[str]]:
    """The `groups` and `group-components` lists that profiles/slurm shows commented out."""
    text = (REPO / "profiles" / "slurm" / "config.v8+.yaml").read_text()
    block = re.search(r"^# groups:\n(?:^#  .*\n)+^# group-components:\n(?:^#  .*\n)+", text, re.M)
    assert block, "profiles/slurm no longer shows the bundling settings"
    return yaml.safe_load("\n".join(line[2:] for line in block[0].splitlines()))


def test_profile_bundling_settings_bundle_the_jobs_of_each_step(tmp_path):
    samples = 200
    load_bench_dag().write_dataset(tmp_path, samples)
    settings = commented_bundling_settings()
    sizes = {item.split("=")[0]: int(item.split("=")[1]) for item in settings["group-components"]}

    run = run_snakemake(
        tmp_path,
        "--dry-run",
        "--groups",
        *settings["groups"],
        "--group-components",
        *settings["group-components"],
    )

    bundles = Counter(re.findall(r"Group job (\w+) \(jobs", run.stdout + run.stderr))
    # the CPU steps' jobs; transfers run in the Snakemake process (localrules)
    jobs_per_group = {
        f"{step}_{m}_batch": samples // 2 for m in ("ct", "wsi") for step in ("preprocess", "tile")
    }
    assert set(sizes) == set(jobs_per_group)
    assert bundles == {group: -(-n // sizes[group]) for group, n in jobs_per_group.items()}
    assert sum(bundles.values()) < samples * 2 / 10


def test_a_sheet_of_5000_missing_inputs_runs_only_the_good_samples(workdir):
    """How long before and after: benchmarks/bench_missing_inputs.py."""
    from workflow_support import write_config, write_samples

    missing = [
        (
            f"lost-{n:05d}",
            "ct" if n % 2 else "wsi",
            f"data/lost/{n:05d}" + ("" if n % 2 else ".svs"),
        )
        for n in range(5000)
    ]
    write_samples(workdir, [*missing, ("synthetic-01", "wsi", "data/wsi/synthetic-01.tiff")])
    write_config(workdir)

    run = run_snakemake(workdir, timeout=900)

    assert run.samples() == {"synthetic-01"}, "no job for a sample whose input is missing"
    summary = [line for line in run.stderr.splitlines() if "do not exist" in line]
    assert len(summary) == 1 and summary[0].startswith(
        "medprep: 5000 of 5001 samples name inputs that do not exist: lost-00000 "
    )
    assert "and 4997 more (all of them: logs/missing_inputs/samples.tsv)" in summary[0]
    listed = (workdir / "logs/missing_inputs/samples.tsv").read_text().splitlines()
    assert len(listed) == 5001  # the header and one line each
    assert "5001 samples: 5000 failed, 1 ok" in run.stdout
    assert len(run.stdout) + len(run.stderr) < 100_000, "no block of lines per sample"
