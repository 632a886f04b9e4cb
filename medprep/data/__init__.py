"""Read a published dataset for training: ``open_dataset(destination, split=None, run=None)``.

``destination`` is the workflow's ``destination`` (a local folder or ``s3://bucket/prefix``)
holding ``dataset/{run}/``, the index of one run's samples (see ``medprep.data.index``;
``run`` is the workflow's run name, by default the sample sheet's file stem). Without
``run``, the destination's only run is read (or a ``dataset/`` of earlier versions, which
had no run folder). The dataset is read only when its ``manifest.json`` is there (written
last).

- ``ds.tiles[i]`` / ``ds.patches[i]`` return ``(array, row)``: the pixels and the row of
  the table as a dict (sample, patient, label, split, coordinates, ...).
- Iterating over ``ds.tiles`` or ``ds.patches`` yields the same pairs in table order.
- Tiles: (H, W, 3) uint8 RGB, read with one ranged read of their tar shard (``file``,
  ``offset``, ``nbytes``) or one read of their image file.
- Patches: (z, y, x) arrays, int16 HU cut from the sample's volume (read once and kept in
  a small per-sample cache), or the row of the materialised ``patches.npy`` (its dtype:
  int16 HU, uint8 windowed or float32 normalised) when the run wrote one.

PyTorch wrappers are in ``medprep.data.torch`` (imported only when used).
"""

from medprep.data.reader import (
    DATASET_FOLDER,
    Dataset,
    DatasetNotReady,
    Patches,
    Tiles,
    dataset_runs,
    open_dataset,
    published_path,
)

__all__ = [
    "DATASET_FOLDER",
    "Dataset",
    "DatasetNotReady",
    "Patches",
    "Tiles",
    "dataset_runs",
    "open_dataset",
    "published_path",
]
