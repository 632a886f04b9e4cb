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
