"""Read a datalist written by ``python -m networks.data.prepare``.

Datalist keys (all written by ``prepare``)::

    name, dataset, description, tensorImageSize, modality {"0": ...}, labels {"0": "background", ...},
    num_folds, numTraining, numTest, source {...},
    folds     [{"train": [id, ...], "val": [id, ...]}, ...]        (num_folds entries, as in the paper)
    training  [{"id": ..., "image": ..., "label": ..., "fold": k}, ...]   k = the fold that validates it
    test      [{"id": ..., "image": ..., "label": ...}, ...]           the paper's held-out test set

``image`` / ``label`` paths are relative to the datalist file's directory (the ``base_dir`` default of
MONAI's ``load_decathlon_datalist``) unless they were written absolute (``--absolute True``).

Bundle configs can use, for instance::

    "datalist": "$networks.data.load_fold(@datalist_file, @fold)",
    "train_files": "$@datalist[0]", "val_files": "$@datalist[1]",
    "test_files": "$networks.data.load_test(@datalist_file)"
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

NUM_FOLDS = 5
PATH_KEYS = ("image", "label")

Item = Dict[str, Any]


def load_datalist(datalist_path: str) -> Dict[str, Any]:
    """Load a datalist JSON, with a ValueError naming the file when it is missing or not valid JSON."""
    path = os.fspath(datalist_path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"datalist not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"datalist {path} must hold a JSON object, got {type(data).__name__}")
    return data


def check_fold(fold: Any, num_folds: int = NUM_FOLDS, source: str = "") -> int:
    """Return ``fold`` as an int in ``0..num_folds-1``; raise a ValueError naming it (and ``source``) otherwise."""
    where = f" (datalist: {source})" if source else ""
    value = fold
    if isinstance(fold, str) and fold.strip().lstrip("-").isdigit():
        value = int(fold.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_folds:
        raise ValueError(f"fold must be an integer in 0..{num_folds - 1}, got {fold!r}{where}")
    return value


def _items(data: Dict[str, Any], key: str, path: str) -> List[Item]:
    items = data.get(key)
    if not isinstance(items, list):
        raise ValueError(f"datalist {path} has no list under key {key!r}")
    for i, item in enumerate(items):
        missing = [k for k in PATH_KEYS if not isinstance(item, dict) or k not in item]
        if missing:
            raise ValueError(f"datalist {path}: {key}[{i}] lacks key(s) {missing}")
    return items


def _resolve(items: List[Item], base_dir: str) -> List[Item]:
    out = []
    for item in items:
        item = dict(item)
        for k in PATH_KEYS:
            item[k] = os.path.normpath(os.path.join(base_dir, item[k]))
        out.append(item)
    return out


def _base_dir(datalist_path: str, base_dir: Optional[str]) -> str:
    if base_dir is not None:
        return os.path.abspath(os.fspath(base_dir))
    return os.path.dirname(os.path.abspath(os.fspath(datalist_path)))


def load_fold(datalist_path: str, fold: int, base_dir: Optional[str] = None) -> Tuple[List[Item], List[Item]]:
    """Return ``(train_items, val_items)`` of cross-validation ``fold`` with absolute image/label paths.

    A training case belongs to the validation set of the fold recorded in its ``fold`` key and to the
    training set of every other fold. Relative paths are resolved against ``base_dir``, by default the
    datalist file's directory. Raises ValueError for a fold outside ``0..num_folds-1`` or a malformed datalist.
    """
    path = os.fspath(datalist_path)
    data = load_datalist(path)
    num_folds = int(data.get("num_folds", NUM_FOLDS))
    k = check_fold(fold, num_folds, path)
    items = _items(data, "training", path)
    for i, item in enumerate(items):
        if not isinstance(item.get("fold"), int) or not 0 <= item["fold"] < num_folds:
            raise ValueError(f"datalist {path}: training[{i}] ({item.get('id')}) has no valid 'fold' key")
    base = _base_dir(path, base_dir)
    train = _resolve([it for it in items if it["fold"] != k], base)
    val = _resolve([it for it in items if it["fold"] == k], base)
    if not val:
        raise ValueError(f"datalist {path}: fold {k} has no validation cases")
    return train, val


def load_test(datalist_path: str, base_dir: Optional[str] = None) -> List[Item]:
    """Return the held-out ``test`` items with absolute image/label paths (see :func:`load_fold`)."""
    path = os.fspath(datalist_path)
    return _resolve(_items(load_datalist(path), "test", path), _base_dir(path, base_dir))


def load_split(
    datalist_path: str, split: str, fold: Optional[int] = None, base_dir: Optional[str] = None
) -> List[Item]:
    """One list for a ``_target_`` config entry: ``split`` is "train" or "val" (needs ``fold``) or "test"."""
    if split == "test":
        return load_test(datalist_path, base_dir)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r} (datalist: {datalist_path})")
    train, val = load_fold(datalist_path, fold, base_dir)
    return train if split == "train" else val
