"""PyTorch datasets over ``medprep.data`` (needs torch; medprep does not install it).

- ``MapDataset(items)``: map-style; ``items`` is ``ds.tiles`` or ``ds.patches``.
- ``IterableDataset(items)``: streams the items in table order, each DataLoader worker
  taking every ``num_workers``-th item, so no item is read twice.

Each item is ``transform(array, row)``, by default ``(tensor, label)``: the array as a
tensor (tiles (3, H, W) uint8, channels first; patches (1, z, y, x)) and the row's
``label`` ("" when the sample has none), which ``default_collate`` batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.utils.data


def default_transform(array: np.ndarray, row: dict[str, Any]) -> tuple[torch.Tensor, str]:
    """(tensor, label): tiles (H, W, 3) -> (3, H, W); patches (z, y, x) -> (1, z, y, x)."""
    tensor = torch.from_numpy(np.array(array))
    if tensor.ndim == 3 and tensor.shape[-1] == 3 and "tile_id" in row:
        tensor = tensor.permute(2, 0, 1)
    else:
        tensor = tensor.unsqueeze(0)
    label = row.get("label")
    return tensor, "" if label is None else str(label)


class MapDataset(torch.utils.data.Dataset):
    def __init__(self, items, transform: Callable | None = None) -> None:
        self.items = items
        self.transform = transform or default_transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        array, row = self.items[index]
        return self.transform(array, row)


class IterableDataset(torch.utils.data.IterableDataset):
    def __init__(self, items, transform: Callable | None = None) -> None:
        self.items = items
        self.transform = transform or default_transform

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for index in range(worker, len(self.items), workers):
            array, row = self.items[index]
            yield self.transform(array, row)
