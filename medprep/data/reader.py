"""The reader behind ``medprep.data.open_dataset`` (see ``medprep.data``)."""

from __future__ import annotations

import gzip
import io
import json
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from medprep.ct.hu import AIR_HU  # the fill of patch parts beyond the volume
from medprep.storage import is_s3, join, layout
from medprep.storage.read import exists, read_bytes

DATASET_FOLDER = "dataset"


class DatasetNotReady(FileNotFoundError):
    """The destination has no complete dataset (no ``dataset/{run}/manifest.json``)."""


STAIN_MODES = ("normalise", "augment")


def published_path(
    folder: str | os.PathLike, name: str, *, settings: dict[str, Any] | None = None
) -> str:
    """Where the publication in ``folder`` keeps its file ``name`` now: a path (local
    destinations) or an ``s3://`` URI, read from the folder's ``manifest.json`` (its files
    live in a version folder: ``medprep.storage.layout``; both layouts are read).

    ``folder``: a sample's ``{destination}/{modality}/{sample}`` or a run's
    ``{destination}/dataset/{run}``; ``name``: as the manifest lists it, e.g.
    ``tiles/S1_patches.h5`` or ``preprocess/volume.nii.gz``."""
    location = os.fspath(folder)
    try:
        manifest = json.loads(read_bytes(join(location, "manifest.json"), settings=settings or {}))
    except FileNotFoundError:
        raise DatasetNotReady(f"{location}: no manifest.json (not published yet)") from None
    entry = layout.manifest_files(manifest).get(name)
    if entry is None:
        raise KeyError(f"{location}/manifest.json lists no {name}")
    relative = layout.entry_path(entry)
    if is_s3(location):
        return join(location, relative)
    return os.path.join(location, *relative.split("/"))


def open_dataset(
    destination: str | os.PathLike,
    split: str | None = None,
    *,
    run: str | None = None,
    settings: dict[str, Any] | None = None,
    cache_volumes: int = 2,
    stain: str | None = None,
    stain_target: Any = None,
    stain_seed: int = 0,
    stain_sigma: tuple[float, float] = (0.2, 0.0),
) -> Dataset:
    """The dataset of run ``run`` published under ``destination``, restricted to ``split``.

    ``run``: the workflow's run name; None = the destination's only run (a ValueError
    names them when there are several). ``settings`` are the config's ``storage`` settings
    for s3:// (endpoint_url, region, profile, max_attempts); credentials come from the
    standard AWS chain. ``cache_volumes`` CT volumes are kept in memory (per process) for
    patches cut on the fly.

    ``stain`` (slide tiles; see ``medprep.wsi.stain``): None = tiles as written;
    ``"normalise"`` = each tile mapped from its slide's stain vectors (estimated at
    preprocess) to ``stain_target``: None = Macenko's reference H&E, a sample's name
    (its recorded vectors), an H&E image (uint8 RGB array: vectors estimated on it), or
    explicit vectors (``medprep.wsi.stain.StainVectors`` or a dict ``{"h": [r, g, b],
    "e": [r, g, b], "max_concentrations": [h, e]}``); ``"augment"`` = each tile's H and E
    concentrations scaled by ``1 +- stain_sigma[0]`` and shifted by ``+- stain_sigma[1]``
    (of the stain's strength), uniform, drawn from ``stain_seed``, the sample, the tile
    and the epoch (``ds.tiles.set_epoch``). Tiles of slides without vectors
    (fluorescence, too little tissue, one stain) come as written; the row's ``stain``
    says what was done to each tile (``normalised``, ``augmented`` or ``as_written``).
    """
    if stain is not None and stain not in STAIN_MODES:
        raise ValueError(f"stain must be None, 'normalise' or 'augment', not {stain!r}")
    return Dataset(
        os.fspath(destination),
        split,
        settings or {},
        cache_volumes,
        run=run,
        stain=stain,
        stain_target=stain_target,
        stain_seed=stain_seed,
        stain_sigma=stain_sigma,
    )


def dataset_runs(
    destination: str | os.PathLike, settings: dict[str, Any] | None = None
) -> list[str]:
    """The runs with a complete dataset (its ``manifest.json``) under ``destination``."""
    destination, settings = os.fspath(destination), settings or {}
    if is_s3(destination):
        from medprep.storage.s3_connect import parse_uri
        from medprep.storage.s3_listing import list_objects

        location = parse_uri(join(destination, DATASET_FOLDER) + "/")
        keys = [o.key for o in list_objects(settings, location.bucket, location.key) or []]
        relative = [key[len(location.key) :].split("/") for key in keys]
        return sorted(parts[0] for parts in relative if parts[1:] == ["manifest.json"])
    folder = os.path.join(destination, DATASET_FOLDER)
    if not os.path.isdir(folder):
        return []
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "manifest.json"))
    )


def _dataset_folder(destination: str, run: str | None, settings: dict[str, Any]) -> str:
    """``dataset/{run}``; without ``run``: the only run's, or the run-less earlier layout."""
    if run is not None:
        return f"{DATASET_FOLDER}/{run}"
    runs = dataset_runs(destination, settings)
    if len(runs) == 1:
        return f"{DATASET_FOLDER}/{runs[0]}"
    if len(runs) > 1:
        raise ValueError(
            f"{destination} holds the datasets of several runs ({', '.join(runs)}): "
            "pass run=NAME to open_dataset"
        )
    return DATASET_FOLDER  # published by an earlier version: no run folder


class Dataset:
    def __init__(
        self,
        destination: str,
        split: str | None,
        settings: dict,
        cache: int,
        *,
        run: str | None = None,
        stain: str | None = None,
        stain_target: Any = None,
        stain_seed: int = 0,
        stain_sigma: tuple[float, float] = (0.2, 0.0),
    ) -> None:
        self.destination = destination
        self.settings = settings
        self.folder = _dataset_folder(destination, run, settings)
        manifest_uri = self.uri(f"{self.folder}/manifest.json")
        if not exists(manifest_uri, settings):
            raise DatasetNotReady(f"no dataset at {destination} (missing {manifest_uri})")
        self.manifest = json.loads(read_bytes(manifest_uri, settings=settings))
        # where each table is: its version folder (medprep.storage.layout), or its name
        self.paths = {name: f["path"] for name, f in layout.manifest_files(self.manifest).items()}
        names = list(self.manifest["splits"]["fractions"])
        if split is not None and split not in names:
            raise ValueError(f"unknown split {split!r}; the dataset has {names}")
        self.split = split
        self.all_samples = self._table("samples.parquet", filtered=False)
        self.samples = self._in_split(self.all_samples)
        stain_options = None
        if stain is not None:
            stain_options = StainOptions(
                stain,
                self._stain_target(stain_target),
                int(stain_seed),
                (float(stain_sigma[0]), float(stain_sigma[1])),
            )
        self.tiles = Tiles(self, self._table("tiles.parquet"), stain_options)
        self.patches = Patches(self, self._table("patches.parquet"), cache)

    def stain_vectors(self, sample: str):
        """The stain vectors of ``sample``'s tiles as written (``medprep.wsi.stain``), or
        None when its slide has none (fluorescence, degenerate estimate, CT). Tiles baked
        normalised (``tiles_stain`` normalised) have the reference's."""
        from medprep.wsi import stain

        rows = self.all_samples[self.all_samples["sample"] == sample]
        if rows.empty:
            raise ValueError(f"no sample {sample!r} in the dataset")
        row = rows.iloc[0]
        if "stain_status" not in row.index:  # an index of an earlier version
            return None
        if row["tiles_stain"] == "normalised":
            return stain.REFERENCE
        if row["stain_status"] != "ok":
            return None
        return stain.StainVectors.from_dict(
            {
                "h": [row["stain_h_r"], row["stain_h_g"], row["stain_h_b"]],
                "e": [row["stain_e_r"], row["stain_e_g"], row["stain_e_b"]],
                "max_concentrations": [row["stain_max_h"], row["stain_max_e"]],
            }
        )

    def _stain_target(self, target: Any):
        from medprep.wsi import stain

        if target is None:
            return stain.REFERENCE
        if isinstance(target, stain.StainVectors):
            return target
        if isinstance(target, dict):
            return stain.StainVectors.from_dict(target)
        if isinstance(target, str):
            vectors = self.stain_vectors(target)
            if vectors is None:
                raise ValueError(f"sample {target!r} has no stain vectors to normalise to")
            return vectors
        if isinstance(target, np.ndarray):
            estimate = stain.estimate_rgb(target)
            if estimate.vectors is None:
                raise ValueError(f"stain_target image: no stain vectors ({estimate.reason})")
            return estimate.vectors
        raise ValueError(
            "stain_target must be None, a sample name, an RGB image, StainVectors or a dict"
        )

    def file(self, name: str) -> str:
        """Where the index keeps its file ``name`` (e.g. ``datalist.json``): a path or URI."""
        if name not in self.paths:
            raise KeyError(f"the dataset index lists no {name}")
        return self.uri(f"{self.folder}/{self.paths[name]}")

    def uri(self, relative: str) -> str:
        """A path relative to the destination (as in the tables) as a path or URI."""
        if is_s3(self.destination):
            return join(self.destination, relative)
        return os.path.join(self.destination, *relative.split("/"))

    def read(
        self, relative: str, offset: int | None = None, size: int | None = None, exact=True
    ) -> bytes:
        """Bytes of a file relative to the destination: all, or ``size`` from ``offset``."""
        return read_bytes(self.uri(relative), offset, size, self.settings, exact=exact)

    def _table(self, name: str, filtered: bool = True):
        import pyarrow.parquet as pq

        relative = self.paths.get(name, name)
        table = pq.read_table(io.BytesIO(self.read(f"{self.folder}/{relative}"))).to_pandas()
        return self._in_split(table) if filtered else table

    def _in_split(self, table):
        if self.split is not None:
            table = table[table["split"] == self.split].reset_index(drop=True)
        return table

    def __repr__(self) -> str:
        return (
            f"Dataset({self.destination!r}, split={self.split!r}: {len(self.samples)} samples, "
            f"{len(self.tiles)} tiles, {len(self.patches)} patches)"
        )


class _Items:
    """Rows of one table and their arrays: ``len``, ``[i]`` and iteration."""

    def __init__(self, dataset: Dataset, table) -> None:
        self.dataset = dataset
        self.table = table
        self._columns: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.table)

    def row(self, index: int) -> dict[str, Any]:
        """Row ``index`` of the table as a dict of plain values (missing values None)."""
        if self._columns is None:  # one array per column: compact, and fast to index
            self._columns = {name: self.table[name].to_numpy() for name in self.table.columns}
        return {name: _plain(values[index]) for name, values in self._columns.items()}

    def __getitem__(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        row = self.row(index)
        return self.array(row), row

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        for index in range(len(self)):
            yield self[index]

    def array(self, row: dict[str, Any]) -> np.ndarray:
        raise NotImplementedError


def _pandas_na() -> Any:
    import pandas as pd

    return pd.NA


def _plain(value: Any) -> Any:
    """A table cell as a plain Python value; None for missing values."""
    if value is None or value is _pandas_na():
        return None
    if isinstance(value, float | np.floating) and np.isnan(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


def decode_image(data: bytes, name: str) -> np.ndarray:
    """A JPEG or PNG tile (by ``name``'s extension) as an (H, W, 3) uint8 array."""
    import imagecodecs

    if name.endswith((".jpg", ".jpeg")):
        return imagecodecs.jpeg8_decode(data)
    if name.endswith(".png"):
        return imagecodecs.png_decode(data)
    raise ValueError(f"unknown tile image type: {name}")


@dataclass(frozen=True)
class StainOptions:
    mode: str  # "normalise" or "augment"
    target: Any  # medprep.wsi.stain.StainVectors
    seed: int
    sigma: tuple[float, float]


class Tiles(_Items):
    """WSI tiles: (H, W, 3) uint8 RGB arrays, as written or stain-normalised/augmented
    (``open_dataset``'s ``stain``)."""

    def __init__(self, dataset: Dataset, table, stain: StainOptions | None = None) -> None:
        super().__init__(dataset, table)
        self.stain = stain
        self.epoch = 0
        self._vectors: dict[str, Any] = {}
        self._matrices: dict[str, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        """Draw new stain augmentations: a tile's depends on the seed, itself and this."""
        self.epoch = int(epoch)

    def _source(self, sample: str):
        if sample not in self._vectors:
            self._vectors[sample] = self.dataset.stain_vectors(sample)
        return self._vectors[sample]

    def _stained(self, pixels: np.ndarray, row: dict[str, Any]) -> tuple[np.ndarray, str]:
        from medprep.wsi import stain

        options = self.stain
        source = self._source(row["sample"]) if options is not None else None
        if options is None or source is None:
            return pixels, "as_written"
        if options.mode == "normalise":
            matrix = self._matrices.get(row["sample"])
            if matrix is None:
                matrix = stain.normalisation_matrix(source, options.target)
                self._matrices[row["sample"]] = matrix
            return stain.apply_od_matrix(pixels, matrix), "normalised"
        key = [options.seed, self.epoch, zlib.crc32(row["sample"].encode()), int(row["tile_id"])]
        scale, shift = stain.random_augmentation(np.random.default_rng(key), *options.sigma)
        matrix, offset = stain.augmentation_matrix(source, scale, shift)
        return stain.apply_od_matrix(pixels, matrix, offset), "augmented"

    def raw(self, row: dict[str, Any]) -> bytes:
        """The encoded image of a tile: one (ranged) read."""
        if row.get("file") is None:
            raise ValueError(
                f"tile {row['tile_id']} of {row['sample']} has no stored pixels "
                "(wsi.tile.container: coords)"
            )
        offset, size = row.get("offset"), row.get("nbytes")
        if offset is None:
            return self.dataset.read(row["file"])
        return self.dataset.read(row["file"], int(offset), int(str(size)))

    def array(self, row: dict[str, Any]) -> np.ndarray:
        """The tile's pixels; with ``stain``, also sets ``row["stain"]`` (what was done)."""
        pixels = decode_image(self.raw(row), row.get("member") or row["file"])
        if self.stain is None:
            return pixels
        pixels, row["stain"] = self._stained(pixels, row)
        return pixels


class Patches(_Items):
    """CT patches: (z, y, x) arrays (int16 HU unless materialised as uint8/float32)."""

    def __init__(self, dataset: Dataset, table, cache: int) -> None:
        super().__init__(dataset, table)
        self.cache_size = max(1, int(cache))
        self._volumes: OrderedDict[str, np.ndarray] = OrderedDict()
        self._arrays: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy without the caches and the lock
        state = {**self.__dict__, "_volumes": OrderedDict(), "_arrays": {}}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def volume(self, relative: str) -> np.ndarray:
        """The (z, y, x) int16 HU volume of a sample, cached (least recently used out)."""
        with self._lock:
            if relative in self._volumes:
                self._volumes.move_to_end(relative)
                return self._volumes[relative]
        volume = read_volume(self.dataset.read(relative))
        with self._lock:
            self._volumes[relative] = volume
            while len(self._volumes) > self.cache_size:
                self._volumes.popitem(last=False)
        return volume

    def array(self, row: dict[str, Any]) -> np.ndarray:
        if row.get("array") is not None:
            return self._materialised(row["array"], int(row["array_row"]))
        volume = self.volume(row["volume"])
        start = np.array([row["z0"], row["y0"], row["x0"]], dtype=np.int64)
        size = (row["z1"] - row["z0"], row["y1"] - row["y0"], row["x1"] - row["x0"])
        return cut_patch(volume, start, size, AIR_HU)

    def _materialised(self, relative: str, index: int) -> np.ndarray:
        if not is_s3(self.dataset.destination):
            if relative not in self._arrays:
                self._arrays[relative] = np.load(self.dataset.uri(relative), mmap_mode="r")
            return np.array(self._arrays[relative][index])
        if relative not in self._arrays:
            self._arrays[relative] = npy_layout(self.dataset.read(relative, 0, 4096, exact=False))
        dtype, shape, header = self._arrays[relative]
        item = int(np.prod(shape[1:])) * dtype.itemsize
        data = self.dataset.read(relative, header + index * item, item)
        return np.frombuffer(data, dtype=dtype).reshape(shape[1:])


def npy_layout(head: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, data offset) of a C-order ``.npy`` from its first bytes."""
    stream = io.BytesIO(head)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    if fortran:
        raise ValueError("patches.npy is in Fortran order")
    return dtype, shape, stream.tell()


def read_volume(data: bytes) -> np.ndarray:
    """A NIfTI (.nii.gz or .nii bytes) as a (z, y, x) array (NIfTI's x, y, z transposed)."""
    import nibabel as nib

    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    image = nib.Nifti1Image.from_bytes(data)
    return np.ascontiguousarray(np.asanyarray(image.dataobj).transpose(2, 1, 0))


def cut_patch(
    volume: np.ndarray, start: np.ndarray, size: tuple[int, int, int], fill: int
) -> np.ndarray:
    """The patch at ``start`` (z, y, x) of ``size``; ``fill`` (air) beyond the volume."""
    from medprep.ct.patches import extract

    out = np.empty(size, dtype=volume.dtype)
    extract(volume, start, size, fill, out)
    return out
