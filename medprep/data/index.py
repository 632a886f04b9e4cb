"""The dataset index of a destination: every tile and patch of the cohort in one table.

``build`` reads only the per-sample tables and step manifests (never pixels) and
streams them, sample by sample, into three Parquet files:

- ``tiles.parquet``: one row per kept WSI tile: sample, patient, label, split, the
  per-sample tile table's columns (level-0 box ``x``, ``y``, ``width_l0``, ``height_l0``;
  ``mpp`` achieved; QC scores; ``label_fraction`` for samples with region annotations,
  null for the others) and where the pixels are: ``file`` relative to the
  destination (a tar shard or an image file), ``member`` (the tar member, = the
  WebDataset key + extension), ``offset`` and ``nbytes`` of the image data in ``file``
  (one ranged read gets a tile);
- ``patches.parquet``: one row per CT patch: the patch table's voxel box (z0:z1, y0:y1,
  x0:x1 in the preprocessed volume), centre in voxels and in LPS mm, and ``volume`` (the
  int16 HU NIfTI, relative to the destination), ``array`` and ``array_row`` when patches
  were materialised (``ct.patches.materialise``);
- ``samples.parquet``: one row per sample: modality, patient, label, split, status,
  counts, and ``publication``: the folder of the sample's published version, relative to
  the destination (``{modality}/{sample}/v-<hex>``, see ``medprep.storage.layout``), which
  every path of the sample's rows starts with; for slides the stain vectors estimated at preprocess (``stain_status``: ok,
  degenerate (``stain_reason`` says why) or null for fluorescence; ``stain_h_r`` ...
  ``stain_e_b``, ``stain_max_h``, ``stain_max_e``) and ``tiles_stain`` (``as_scanned``,
  or ``normalised`` when ``wsi.tile.stain`` baked it into the tiles);
- ``datalist.json``: the CT samples in MONAI's decathlon datalist form (``training``,
  ``validation``, ``test``: one list per split, the config's other split names as they
  are), each item ``image`` (the published HU volume), ``lung_mask``, ``label`` (the
  sheet's; absent when it has none) and ``sample``; paths relative to the file.

The sheet's ``label``, ``patient`` and ``meta_*`` columns are added to every row (a
``label`` column of a per-sample table, per tile or patch, takes precedence over the
sheet's); splits come from ``medprep.data.splits``. Rows are written in row groups as they come, so memory is
bounded by the largest sample plus one row group, whatever the cohort size.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from medprep.common import atomic, statuses
from medprep.common.errors import InputError
from medprep.common.parallel import thread_map
from medprep.ct.patches import TABLE_COLUMNS as CT_TABLE_COLUMNS
from medprep.data import splits
from medprep.wsi.writers import TABLE_COLUMNS as WSI_TABLE_COLUMNS

log = logging.getLogger("medprep.data.index")

FORMAT = 1
ROW_GROUP_ROWS = 131_072
MAX_PENDING_TABLES = 2048  # flush many small per-sample tables as one row group
TABLES = ("tiles.parquet", "patches.parquet", "samples.parquet")
DATALIST = "datalist.json"
FILES = (*TABLES, DATALIST)  # what build writes and publish publishes
# the datalist sits in {destination}/dataset/{run}/v-<hex>/ (the index's published version,
# medprep.storage.layout): its paths climb back to the destination
DATALIST_TO_DESTINATION = "../../.."
# MONAI's names of the usual splits (load_decathlon_datalist's data_list_key)
DATALIST_KEYS = {"train": "training", "val": "validation", "test": "test"}

# sheet columns on every row, after the sample
GROUP_COLUMNS = {"patient": "string", "label": "string", "split": "string"}

# the per-sample tables' own columns, as their writers declare them, and for patches
# where the pixels are (the published volume, or a materialised array and its row)
# region-label columns that only the tables of annotated samples have (null elsewhere)
OPTIONAL_TILE_COLUMNS = {"label_fraction": "float64"}
TILE_COLUMNS = {
    **{k: v for k, v in WSI_TABLE_COLUMNS.items() if k != "sample"},
    **OPTIONAL_TILE_COLUMNS,
}
PATCH_COLUMNS = {**CT_TABLE_COLUMNS, "volume": "string", "array": "string", "array_row": "int64"}
SAMPLE_COLUMNS = {
    "modality": "string",
    "status": "string",
    "tiles": "int64",
    "patches": "int64",
    "candidates": "int64",
    "warnings": "int64",
    "manifest": "string",
    "tiles_stain": "string",
    "stain_status": "string",
    "stain_reason": "string",
    **{f"stain_{stain}_{channel}": "float64" for stain in "he" for channel in "rgb"},
    "stain_max_h": "float64",
    "stain_max_e": "float64",
    "publication": "string",
}
AXES = {
    "tiles": "H, W, 3: rows, columns, RGB (uint8), as decoded from the JPEG/PNG",
    "patches": (
        "z, y, x: the volume's slices, rows, columns (int16 HU; uint8 or float32 when "
        "materialised so); volume.nii.gz as a NIfTI is x, y, z: the same voxels transposed"
    ),
    "patches.npy": "n, z, y, x (row array_row of patches.parquet)",
}


@dataclass
class SampleEntry:
    """One published sample: its sheet values and the local files of its steps.

    ``receipt``: the sample's upload receipt (``upload.json``), which names the version
    its files were published in; without one, the files are taken to be published under
    their names (the layout of earlier versions).
    """

    sample: str
    modality: str
    tile_manifest: str
    preprocess_manifest: str | None = None
    label: str | None = None
    patient: str | None = None
    meta: dict[str, str | None] = field(default_factory=dict)
    receipt: str | None = None

    def published(self) -> dict[str, Any]:
        """The upload receipt ({} without one)."""
        return atomic.read_json(self.receipt) if self.receipt else {}

    def publication(self, receipt: dict[str, Any] | None = None) -> str:
        """Where the sample's files are, relative to the destination: its version folder."""
        version = (self.published() if receipt is None else receipt).get("version")
        return posixpath.join(self.modality, self.sample, *([version] if version else []))


def entries_from_records(
    records: Sequence[dict[str, Any]],
    tile_manifests: Sequence[str],
    preprocess_manifests: Sequence[str],
    receipts: Sequence[str],
) -> list[SampleEntry]:
    """Entries from the rule's params (sheet rows as dicts) and inputs, in the same order."""
    if not len(records) == len(tile_manifests) == len(preprocess_manifests) == len(receipts):
        raise ValueError(
            "dataset: samples, tile and preprocess manifests and receipts differ in number"
        )
    out = []
    for row, tile, pre, receipt in zip(
        records, tile_manifests, preprocess_manifests, receipts, strict=True
    ):
        out.append(
            SampleEntry(
                sample=row["sample"],
                modality=row["modality"],
                tile_manifest=tile,
                preprocess_manifest=pre,
                label=_text(row.get("label")),
                patient=_text(row.get("patient")),
                meta={k: _text(v) for k, v in row.items() if k.startswith("meta_")},
                receipt=receipt,
            )
        )
    return out


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _schema(columns: dict[str, str], meta_columns: Sequence[str]):
    import pyarrow as pa

    types = {
        "string": pa.string(),
        "int64": pa.int64(),
        "int32": pa.int32(),
        "float64": pa.float64(),
        "bool": pa.bool_(),
    }
    fields = [("sample", pa.string())]
    fields += [(name, types[kind]) for name, kind in GROUP_COLUMNS.items()]
    fields += [(name, types[kind]) for name, kind in columns.items()]
    fields += [(name, pa.string()) for name in meta_columns]
    return pa.schema(fields)


class _StreamWriter:
    """A Parquet file written row group by row group, atomically (temp + rename)."""

    def __init__(self, path: str | os.PathLike, schema) -> None:
        import pyarrow.parquet as pq

        self.path = os.fspath(path)
        self.schema = schema
        self._context = atomic.atomic_path(self.path)
        tmp = self._context.__enter__()
        # dictionaries only where values repeat (per-sample constants and shard names)
        repeated = [f.name for f in schema if f.name not in ("member",) and f.type == "string"]
        self._writer = pq.ParquetWriter(tmp, schema, compression="zstd", use_dictionary=repeated)
        self._pending: list = []
        self._rows = 0
        self.rows = 0

    def add(self, table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._rows += table.num_rows
        self.rows += table.num_rows
        if self._rows >= ROW_GROUP_ROWS or len(self._pending) >= MAX_PENDING_TABLES:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self._pending:
            # one chunk per column: writing thousands of small chunks is ~10x slower
            table = pa.concat_tables(self._pending).combine_chunks()
            self._pending, self._rows = [], 0
            self._writer.write_table(table, ROW_GROUP_ROWS)

    def close(self, error: BaseException | None = None) -> None:
        if error is None:
            self.flush()
        self._writer.close()
        if error is None:
            self._context.__exit__(None, None, None)
        else:
            self._context.__exit__(type(error), error, error.__traceback__)


def _artifact(step: dict[str, Any], suffix: str) -> dict[str, str] | None:
    for item in step.get("artifacts", []):
        if item["name"].endswith(suffix):
            return item
    return None


def _constant(value: Any, n: int, kind):
    import pyarrow as pa

    return pa.repeat(pa.scalar(value, type=kind), n)


def _sample_rows(
    entry: SampleEntry,
    table,
    columns: dict[str, str],
    schema,
    split: str,
    patient: str,
    extra: dict[str, Any],
):
    """The per-sample table with the dataset's columns, in ``schema`` order."""
    import pyarrow as pa

    n = table.num_rows
    data = {}
    for f in schema:
        name = f.name
        if name == "sample":
            data[name] = _constant(entry.sample, n, f.type)
        elif name == "patient":
            data[name] = _constant(patient, n, f.type)
        elif name == "label" and "label" in table.column_names:
            # a per-tile/per-patch label (e.g. from region annotations) wins over the sheet's
            data[name] = table.column("label").cast(f.type)
        elif name == "label":
            data[name] = _constant(entry.label, n, f.type)
        elif name == "split":
            data[name] = _constant(split, n, f.type)
        elif name in extra:
            value = extra[name]
            if isinstance(value, (pa.Array, pa.ChunkedArray)):
                data[name] = value.cast(f.type)
            else:
                data[name] = _constant(value, n, f.type)
        elif name in OPTIONAL_TILE_COLUMNS and name not in table.column_names:
            data[name] = pa.nulls(n, f.type)
        elif name in columns:
            if name not in table.column_names:
                raise InputError(
                    f"its table has no column '{name}' (made by an older medprep: rerun "
                    "its tile step)",
                    sample=entry.sample,
                )
            data[name] = table.column(name).cast(f.type)
        else:  # meta_*
            data[name] = _constant(entry.meta.get(name), n, f.type)
    return pa.table(data, schema=schema)


def _prefixed(column, prefix: str):
    """``prefix/`` + each non-null value of a string column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column.null_count == len(column):
        return column.cast(pa.string())
    return pc.binary_join_element_wise(pa.scalar(prefix + "/"), column.cast(pa.string()), "")


def _published_folder(publication: str, artifact_name: str) -> str:
    """Where an artifact's folder is, relative to the destination."""
    return posixpath.join(publication, posixpath.dirname(artifact_name))


def _read_table(path: str, entry: SampleEntry):
    import pyarrow.parquet as pq

    try:
        # ParquetFile.read without threads: ~10x faster than read_table for small tables
        with pq.ParquetFile(path) as table:
            return table.read(use_threads=False)
    except (OSError, ValueError) as error:
        raise InputError(
            f"cannot read its table: {error}", path=path, sample=entry.sample
        ) from error


def _wsi_extra(publication: str, table, table_name: str) -> dict[str, Any]:
    folder = _published_folder(publication, table_name)
    return {"file": _prefixed(table.column("file"), folder)}


def _ct_extra(
    entry: SampleEntry, publication: str, table, tile: dict[str, Any], pre: dict[str, Any] | None
):
    import pyarrow as pa

    n = table.num_rows
    volume = _artifact(pre or {}, "volume.nii.gz")
    array = _artifact(tile, "patches.npy")
    extra: dict[str, Any] = {
        "volume": posixpath.join(publication, volume["name"]) if volume else None,
        "array": posixpath.join(publication, array["name"]) if array else None,
        "array_row": table.column("patch").cast(pa.int64()) if array else None,
    }
    if n and volume is None:
        raise InputError("patches but no published volume", sample=entry.sample)
    return extra


def stain_values(record: dict[str, Any] | None) -> dict[str, Any]:
    """The ``stain_*`` columns of a slide's preprocess stain record (None: fluorescence,
    CT or a preprocess of an earlier version: all null)."""
    values: dict[str, Any] = {name: None for name in SAMPLE_COLUMNS if name.startswith("stain_")}
    if not record:
        return values
    values["stain_status"] = record.get("status")
    values["stain_reason"] = record.get("reason")
    if record.get("status") == "ok":
        for stain in "he":
            for channel, value in zip("rgb", record[stain], strict=True):
                values[f"stain_{stain}_{channel}"] = float(value)
        values["stain_max_h"], values["stain_max_e"] = (
            float(v) for v in record["max_concentrations"]
        )
    return values


def datalist_item(
    entry: SampleEntry, publication: str, pre: dict[str, Any] | None
) -> dict[str, str] | None:
    """A CT sample's datalist item (paths relative to the datalist), or None without a
    volume; ``publication``: the sample's published version folder (``SampleEntry``)."""
    volume = _artifact(pre or {}, "volume.nii.gz")
    if volume is None:
        return None
    folder = posixpath.join(DATALIST_TO_DESTINATION, publication)
    item = {"image": posixpath.join(folder, volume["name"])}
    mask = _artifact(pre or {}, "lung_mask.nii.gz")
    if mask is not None:
        item["lung_mask"] = posixpath.join(folder, mask["name"])
    if entry.label is not None:
        item["label"] = entry.label
    item["sample"] = entry.sample
    return item


def datalist(items: Iterable[tuple[str, dict[str, str]]], splits_in_order: Iterable[str]):
    """The decathlon datalist of ``(split, item)`` pairs: a list per split, every split
    present (empty or not), in the configured order, under MONAI's names."""
    out: dict[str, list] = {DATALIST_KEYS.get(name, name): [] for name in splits_in_order}
    for split, item in items:
        out[DATALIST_KEYS.get(split, split)].append(item)
    return out


def _load_sample(entry: SampleEntry, schemas, fractions, seed):
    """Read one sample's manifests and table: its rows in the index and its samples row."""
    patient = splits.patient_key(entry.patient, entry.sample)
    split = splits.split_of(patient, fractions, seed)
    tile = atomic.read_json(entry.tile_manifest)
    summary = tile.get("summary", {})
    if entry.modality == "wsi":
        item = _artifact(tile, "tiles.parquet")
        kind, columns = "tiles", TILE_COLUMNS
    else:
        item = _artifact(tile, "patches.parquet")
        kind, columns = "patches", PATCH_COLUMNS
    if item is None:
        raise InputError(
            "its tile manifest lists no table", path=entry.tile_manifest, sample=entry.sample
        )
    table = _read_table(item["path"], entry)
    pre = atomic.read_json(entry.preprocess_manifest) if entry.preprocess_manifest else None
    publication = entry.publication()
    if kind == "tiles":
        extra = _wsi_extra(publication, table, item["name"])
        stain = {
            "tiles_stain": summary.get("stain", "as_scanned"),
            **stain_values((pre or {}).get("summary", {}).get("stain")),
        }
        datalist_entry = None
    else:
        extra = _ct_extra(entry, publication, table, tile, pre)
        stain = {"tiles_stain": None, **stain_values(None)}
        datalist_entry = datalist_item(entry, publication, pre)
    rows = _sample_rows(entry, table, columns, schemas[kind], split, patient, extra)
    sample_values = {
        "modality": entry.modality,
        "status": summary.get("status", statuses.OK),
        "tiles": rows.num_rows if kind == "tiles" else 0,
        "patches": rows.num_rows if kind == "patches" else 0,
        "candidates": summary.get("candidates"),
        "warnings": len(summary.get("warnings") or []),
        "manifest": posixpath.join(entry.modality, entry.sample, "manifest.json"),
        **stain,
        "publication": publication,
    }
    sample_row = {
        "sample": entry.sample,
        "patient": patient,
        "label": entry.label,
        "split": split,
        **sample_values,
        **entry.meta,
    }
    return entry, kind, rows, sample_row, split, patient, datalist_entry


def build(
    entries: Iterable[SampleEntry],
    out_dir: str | os.PathLike,
    *,
    fractions: dict[str, float] | None = None,
    seed: int | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    """Write ``tiles.parquet``, ``patches.parquet``, ``samples.parquet`` and
    ``datalist.json`` into ``out_dir``; return the content of the dataset's
    manifest.json (without files).

    ``fractions`` and ``seed``: the ``dataset`` settings (None: the schema's defaults).

    ``threads`` read the per-sample tables ahead (in order, a bounded number at a time).
    """
    import pyarrow as pa

    entries = list(entries)
    defaults = splits.DatasetSettings()
    fractions = splits.check_fractions(fractions or defaults.splits)
    seed = defaults.seed if seed is None else seed
    meta_columns = sorted({k for e in entries for k in e.meta})
    schemas = {
        "tiles": _schema(TILE_COLUMNS, meta_columns),
        "patches": _schema(PATCH_COLUMNS, meta_columns),
        "samples": _schema(SAMPLE_COLUMNS, meta_columns),
    }
    os.makedirs(out_dir, exist_ok=True)
    writers = {
        name: _StreamWriter(os.path.join(out_dir, f"{name}.parquet"), schema)
        for name, schema in schemas.items()
    }
    groups: dict[str, tuple[str | None, str]] = {}
    rows_per_split: Counter = Counter()
    statuses: Counter = Counter()
    error: BaseException | None = None

    sample_rows: list[dict[str, Any]] = []
    datalist_items: list[tuple[str, dict[str, str]]] = []

    def load(entry: SampleEntry):
        return _load_sample(entry, schemas, fractions, seed)

    try:
        for entry, kind, rows, sample_row, split, patient, item in thread_map(
            load, entries, threads
        ):
            groups.setdefault(patient, (entry.label, split))
            if item is not None:
                datalist_items.append((split, item))
            writers[kind].add(rows)
            sample_rows.append(sample_row)
            if len(sample_rows) >= MAX_PENDING_TABLES:
                writers["samples"].add(pa.Table.from_pylist(sample_rows, schema=schemas["samples"]))
                sample_rows = []
            rows_per_split[(kind, split)] += rows.num_rows
            statuses[sample_row["status"]] += 1
        if sample_rows:
            writers["samples"].add(pa.Table.from_pylist(sample_rows, schema=schemas["samples"]))
    except BaseException as failure:
        error = failure
        raise
    finally:
        for writer in writers.values():
            writer.close(error)
    atomic.write_json(os.path.join(out_dir, DATALIST), datalist(datalist_items, fractions))
    balance = splits.balance(((p, label, split) for p, (label, split) in groups.items()), fractions)
    counts = {
        "samples": len(entries),
        "patients": len(groups),
        "tiles": writers["tiles"].rows,
        "patches": writers["patches"].rows,
        "status": dict(sorted(statuses.items())),
        "rows_per_split": {
            kind: {s: rows_per_split[(kind, s)] for s in fractions} for kind in ("tiles", "patches")
        },
    }
    log.info(
        "dataset: %d samples of %d patients, %d tiles, %d patches",
        counts["samples"],
        counts["patients"],
        counts["tiles"],
        counts["patches"],
    )
    return {
        "format": FORMAT,
        "kind": "medprep-dataset",
        "splits": {"fractions": fractions, "seed": int(seed), "by": "patient"},
        "counts": counts,
        "label_balance": balance,
        "meta_columns": meta_columns,
        "axes": AXES,
        "tables": list(TABLES),
        "datalist": DATALIST,
    }


def sheet_records(sample_table: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """What the dataset rule needs of each sample's sheet row, in sheet order: sample,
    modality, label, patient and the meta_* columns (a rerun trigger when they change)."""
    return [
        {
            "sample": name,
            "modality": row["modality"],
            "label": _text(row.get("label")),
            "patient": _text(row.get("patient")),
            **{k: _text(v) for k, v in row.items() if str(k).startswith("meta_")},
        }
        for name, row in sample_table.items()
    ]


def step_paths(records: Sequence[dict[str, Any]], step: str) -> list[str]:
    """The local step manifest of every sample (``results/{modality}/{sample}/{step}.json``)."""
    return [f"results/{r['modality']}/{r['sample']}/{step}.json" for r in records]


def table_paths(records: Sequence[dict[str, Any]]) -> list[str]:
    """The per-sample tile/patch tables the index is built from."""
    names = {"wsi": "tiles/tiles.parquet", "ct": "patches/patches.parquet"}
    return [f"results/{r['modality']}/{r['sample']}/{names[r['modality']]}" for r in records]


def mem_mb(attempt: int = 1) -> int:
    """Memory of the dataset job: bounded by one row group and the largest sample table
    (see benchmarks/results/dataset.txt), not by the cohort size."""
    return 1024 * attempt


def publish(
    files: dict[str, str],
    destination: str,
    manifest: dict[str, Any],
    *,
    threads: int = 1,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Publish the tables (``name -> local path``) to ``destination`` (``.../dataset/{run}``)
    through ``medprep.storage``: the tables in a new version, then ``manifest.json``
    switched to it and the previous version removed; the receipt with credentials
    redacted."""
    from medprep import storage
    from medprep.common.redact import redact

    artifacts = [{"name": name, "path": path} for name, path in files.items()]
    receipt = storage.publish(
        artifacts, destination, manifest=manifest, threads=threads, settings=settings or {}
    )
    receipt["destination"] = redact(receipt["destination"])
    receipt["manifest"] = redact(receipt["manifest"])
    return receipt


def referenced_publications(destination: str, settings: dict[str, Any] | None = None) -> set[str]:
    """The sample publications every dataset index under ``destination`` refers to.

    Each is the folder of a sample's files relative to the destination (the
    ``publication`` column of ``samples.parquet``: ``{modality}/{sample}/v-<hex>``); an
    index of an earlier version (no such column) refers to its samples' files under
    their names (``{modality}/{sample}``). Raises when an index cannot be read: nothing
    may be removed on the word of a listing that missed one.
    """
    import io
    import json

    import pyarrow.parquet as pq

    from medprep.data.reader import DATASET_FOLDER, dataset_runs
    from medprep.storage import join, layout
    from medprep.storage.read import exists, read_bytes

    settings = settings or {}
    folders = [f"{DATASET_FOLDER}/{run}" for run in dataset_runs(destination, settings)]
    if exists(join(destination, DATASET_FOLDER, "manifest.json"), settings):
        folders.append(DATASET_FOLDER)  # the run-less index of earlier versions
    found: set[str] = set()
    for folder in folders:
        manifest = json.loads(
            read_bytes(join(destination, folder, "manifest.json"), None, None, settings)
        )
        files = layout.manifest_files(manifest)
        relative = files.get("samples.parquet", {}).get("path", "samples.parquet")
        data = read_bytes(join(destination, folder, relative), None, None, settings)
        with pq.ParquetFile(io.BytesIO(data)) as parquet:
            names = parquet.schema_arrow.names
            if "publication" in names:
                column = parquet.read(columns=["publication"]).column("publication")
                found.update(value for value in column.to_pylist() if value)
            else:
                rows = parquet.read(columns=["modality", "sample"]).to_pylist()
                found.update(f"{row['modality']}/{row['sample']}" for row in rows)
    return found


def remove_superseded(
    entries: Sequence[SampleEntry],
    destination: str,
    *,
    threads: int = 1,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Remove the earlier versions of ``entries``' samples that no dataset index refers to.

    Called after this run's index is published: an upload keeps the version it replaced
    (and files of the earlier layout) because an index may point at them; once no index
    under ``destination`` does, they go. What each sample's receipt lists as superseded
    is considered; the version a sample's manifest points at never goes.
    """
    from medprep import storage
    from medprep.common.redact import redact

    settings = settings or {}
    pending = []
    for entry in entries:
        superseded = entry.published().get("superseded") or {}
        if superseded.get("versions") or superseded.get("legacy"):
            pending.append((entry, superseded))
    outcome: dict[str, Any] = {"samples": 0, "removed": 0, "kept": [], "refused": []}
    if not pending:
        return outcome
    try:
        referenced = referenced_publications(destination, settings)
    except Exception as error:  # noqa: BLE001 - keeping them all is always safe
        log.warning(
            "kept every earlier version of %d samples: cannot read the dataset indexes of "
            "%s (%s: %s)",
            len(pending),
            redact(destination),
            type(error).__name__,
            redact(str(error)),
        )
        outcome["kept"] = [f"{entry.sample}: all" for entry, _ in pending]
        return outcome

    def sweep(item):
        entry, superseded = item
        folder = posixpath.join(entry.modality, entry.sample)
        versions = [
            v
            for v in superseded.get("versions") or []
            if posixpath.join(folder, v) not in referenced
        ]
        kept = sorted(set(superseded.get("versions") or []) - set(versions))
        legacy = bool(superseded.get("legacy"))
        if legacy and folder in referenced:
            legacy, kept = False, [*kept, "(files of the earlier layout)"]
        done = {"removed": [], "refused": []}
        if versions or legacy:
            done = storage.remove_superseded(
                storage.join(destination, entry.modality, entry.sample),
                versions,
                legacy,
                settings,
                sample=entry.sample,
            )
        return entry, kept, done

    for entry, kept, done in thread_map(sweep, pending, threads):
        outcome["samples"] += bool(done["removed"])
        outcome["removed"] += len(done["removed"])
        outcome["kept"] += [f"{entry.sample}: {item}" for item in kept]
        outcome["refused"] += done["refused"]
    log.info(
        "removed %d superseded versions of %d samples; kept %d that an index refers to",
        outcome["removed"],
        outcome["samples"],
        len(outcome["kept"]),
    )
    for line in outcome["refused"]:
        log.warning("%s", line)
    return outcome
