"""Dataset preparation and datalist loading for the bundles.

``python -m networks.data.prepare`` turns a public download (MSD Task01_BrainTumour, BTCV RawData,
ACDC training) into a MONAI datalist JSON carrying the paper's 5 cross-validation folds and its
held-out test set; :func:`load_fold` / :func:`load_test` read that datalist back for the bundles.
``prepare`` is not imported here so that ``python -m networks.data.prepare`` runs without warnings.
"""

from .datalist import NUM_FOLDS, load_datalist, load_fold, load_split, load_test

__all__ = ["NUM_FOLDS", "load_datalist", "load_fold", "load_split", "load_test"]
