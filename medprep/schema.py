"""Load the YAML JSON-schemas under ``schemas/``."""

from __future__ import annotations

import functools
import os
from typing import Any


@functools.cache
def load_schema(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)
