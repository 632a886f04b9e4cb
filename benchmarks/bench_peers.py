"""Peer tilers side by side (skeleton: installing only, filled in later)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENVS = HERE / "out" / "peer-venvs"

PEERS = {
    "lazyslide": ["lazyslide==0.13.0"],
    "tiatoolbox": ["tiatoolbox==2.1.3"],
    "histolab": ["histolab==0.7.0"],
}


def install(name: str) -> tuple[Path | None, str]:
    folder = VENVS / name
    python = folder / "bin" / "python"
    stamp = folder / ".installed"
    log = VENVS / f"{name}.log"
    if stamp.exists() and stamp.read_text() == " ".join(PEERS[name]):
        return python, "cached"
    VENVS.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        if not python.exists():
            subprocess.run(
                [sys.executable, "-m", "venv", "--without-pip", str(folder)], check=False
            )
            subprocess.run(
                [sys.executable, "-m", "venv", str(folder)], stdout=out, stderr=out, check=False
            )
        started = time.perf_counter()
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", *PEERS[name]],
            stdout=out,
            stderr=out,
            check=False,
        )
    if done.returncode != 0:
        return None, f"pip install failed (see {log})"
    stamp.write_text(" ".join(PEERS[name]))
    return python, f"installed in {time.perf_counter() - started:.0f} s"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--install-only", action="store_true")
    args = parser.parse_args()
    for name in PEERS:
        print(name, install(name), flush=True)
