"""Serve the bundles with MONAI Label's ``monaibundle`` app (auto-segmentation and training from 3D Slicer / OHIF).

``make label BUNDLE=synapse_bisegmamba STUDIES=/path/to/studies`` installs the server into its own
environment ``.venv-label`` (``make label-install``) and runs :func:`serve` there. By hand, in that
environment::

    python -m networks.label serve synapse_bisegmamba /path/to/studies [--weights model.pt] [--port 8000]

* :func:`prepare_app` lays out the app folder MONAI Label expects: a copy of monailabel's ``monaibundle``
  sample app with each bundle copied to ``<app>/model/<name>/`` (a copy: MONAI Label writes the bundle's
  ``models/`` when it trains), its weights as ``models/model.pt`` and, in the copy's ``train.json``,
  ``resume`` false (a MONAI Label training starts from ``models/model.pt``, not from an earlier run's
  ``models/checkpoint.pt``), plus any top-level overrides (e.g. ``--override '{"pixdim": [3, 1.5, 1.5]}'``, per-axis lists in nnU-Net's axis order like the bundle configs).
* :func:`serve` prepares the app and starts ``monailabel start_server`` with ``--conf models <name>
  --conf zoo_source local`` (offline: MONAI Label otherwise fetches a model index and exits).
* the app's ``main.py`` gets two lines that wrap its ``infer`` (:mod:`.guard`): an unknown model or a missing
  image is answered 4xx with the reason, an input that fails the bundle's input check 422, and a failed
  request's upload is removed.
* :func:`install_standin` puts the stand-in ``torchvision`` of ``networks/label/standin`` on the
  environment's path (see that package's docstring for why).

Only this module's callers need monailabel; importing it does not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .guard import GUARD_LINES

__all__ = ["STANDIN", "BUNDLES", "monaibundle_app", "install_standin", "prepare_app", "server_command", "serve"]

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "standin"
BUNDLES = HERE.parent.parent / "bundles"
# overrides every app copy gets (train.json): MONAI Label fine-tunes from models/model.pt on each request
APP_TRAIN_DEFAULTS: Dict[str, Any] = {"resume": False}
PTH_NAME = "taming_mambas_torchvision_standin.pth"


def monaibundle_app() -> Path:
    """The ``monaibundle`` sample app installed with monailabel (``<prefix>/monailabel/sample-apps/``)."""
    candidates = [Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle"]
    try:
        import monailabel  # noqa: F401

        pkg = Path(monailabel.__file__).resolve().parent
        candidates += [pkg / "sample-apps" / "monaibundle", pkg.parent.parent.parent.parent / "monailabel" / "sample-apps" / "monaibundle"]
    except ImportError:
        pass
    for c in candidates:
        if (c / "main.py").is_file():
            return c
    raise FileNotFoundError("monailabel's monaibundle sample app not found (looked in "
                            + ", ".join(map(str, candidates)) + "); run `make label-install` first")


def install_standin(site_dir: Optional[str] = None) -> str:
    """Write a ``.pth`` in this environment's site-packages that appends ``networks/label/standin`` to
    ``sys.path`` (after site-packages, so an installed torchvision is still preferred); returns its path."""
    target = Path(site_dir or sysconfig.get_paths()["purelib"])
    pth = target / PTH_NAME
    pth.write_text(str(STANDIN) + "\n")
    return str(pth)


def _bundle_source(name: str, bundle_dir: Optional[Union[str, Path]]) -> Path:
    src = Path(bundle_dir) / name if bundle_dir else BUNDLES / name
    if not (src / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"no bundle {name!r} at {src} (expected {src}/configs/inference.json)")
    return src


def _update_json(path: Path, overrides: Mapping[str, Any]) -> None:
    conf = json.loads(path.read_text())
    conf.update(overrides)
    path.write_text(json.dumps(conf, indent=4) + "\n")


def prepare_app(app_dir: Union[str, Path], bundles: Union[str, Sequence[str]], bundle_dir: Optional[str] = None,
                weights: Optional[Union[str, Mapping[str, str]]] = None,
                overrides: Optional[Mapping[str, Any]] = None, refresh: bool = False) -> Path:
    """Lay out a MONAI Label ``monaibundle`` app at ``app_dir`` serving ``bundles``; returns the app folder.

    Args:
        app_dir: the app folder (created from monailabel's sample app when missing).
        bundles: bundle name(s), comma-separated or a list.
        bundle_dir: folder holding the bundles (default: this repository's ``bundles/``; a folder of
            downloaded bundles works the same).
        weights: ``models/model.pt`` to copy into the app's bundle: a path (one bundle) or ``{name: path}``.
            Without it the bundle's own ``models/model.pt`` is used when it has one; a bundle without
            weights is served for training only (MONAI Label skips its inference task).
        overrides: top-level keys set in the copies of ``inference.json`` and ``train.json``
            (e.g. ``{"pixdim": [3.0, 1.5, 1.5]}``, nnU-Net's axis order; the same keys as ``monai.bundle run --key value``).
        refresh: replace an existing copy of the bundle (its ``models/`` are kept unless ``weights`` is given).
    """
    names = [n.strip() for n in bundles.split(",")] if isinstance(bundles, str) else list(bundles)
    if isinstance(weights, (str, os.PathLike)):
        if len(names) != 1:
            raise ValueError("give weights as {bundle: path} when serving several bundles")
        weights = {names[0]: str(weights)}
    weights = dict(weights or {})
    app = Path(app_dir)
    if not (app / "main.py").is_file():
        app.mkdir(parents=True, exist_ok=True)
        shutil.copytree(monaibundle_app(), app, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    main_py = app / "main.py"
    if GUARD_LINES not in main_py.read_text():  # 4xx for bad requests, no failed upload left (guard.py)
        with open(main_py, "a") as f:
            f.write(GUARD_LINES)
    for name in names:
        src, dst = _bundle_source(name, bundle_dir), app / "model" / name
        if dst.exists() and refresh:
            keep = dst / "models"
            if keep.is_dir():
                tmp = app / "model" / f".{name}.models"
                shutil.rmtree(tmp, ignore_errors=True)
                keep.rename(tmp)
            shutil.rmtree(dst)
            dst.mkdir(parents=True)
            if (app / "model" / f".{name}.models").exists():
                (app / "model" / f".{name}.models").rename(dst / "models")
        if not (dst / "configs").is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "predictions", "logs", "eval"))
        if name in weights:
            (dst / "models").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(weights[name], dst / "models" / "model.pt")
        _update_json(dst / "configs" / "train.json", {**APP_TRAIN_DEFAULTS, **dict(overrides or {})})
        if overrides:
            _update_json(dst / "configs" / "inference.json", dict(overrides))
        if not (dst / "models" / "model.pt").is_file():
            print(f"note: {dst}/models/model.pt does not exist: {name} is served for training only until one "
                  "is trained (POST /train/{name}) or given with --weights", file=sys.stderr)
    return app


def server_command(app_dir: Union[str, Path], studies: Union[str, Path], bundles: Union[str, Sequence[str]],
                   host: str = "127.0.0.1", port: int = 8000, conf: Optional[Mapping[str, str]] = None,
                   python: Optional[str] = None) -> List[str]:
    """The ``monailabel start_server`` command line (run it with this environment's python)."""
    names = bundles if isinstance(bundles, str) else ",".join(bundles)
    cmd = [python or sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir),
           "--studies", str(studies), "--host", host, "--port", str(port),
           "--conf", "models", names, "--conf", "zoo_source", "local", "--conf", "sam2", "false"]
    for k, v in (conf or {}).items():
        cmd += ["--conf", str(k), str(v)]
    return cmd


def serve(bundle: str, studies: str, app: str = "label_app", bundle_dir: Optional[str] = None,
          weights: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000,
          override: Optional[Union[str, Mapping[str, Any]]] = None, conf: Optional[Mapping[str, str]] = None,
          refresh: bool = False) -> None:
    """Prepare ``app`` for ``bundle`` (see :func:`prepare_app`) and run the MONAI Label server on ``studies``
    (a folder of NIfTI images; labels go to ``<studies>/labels/final/``) until interrupted.

    ``host`` defaults to 127.0.0.1 (this machine only); use ``--host 0.0.0.0`` to let 3D Slicer / OHIF on
    other machines connect. ``override``: JSON object of top-level config keys (see :func:`prepare_app`).
    """
    if isinstance(override, str):
        override = json.loads(override)
    app_dir = prepare_app(app, bundle, bundle_dir=bundle_dir, weights=weights, overrides=override, refresh=refresh)
    Path(studies).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("MONAI_ZOO_SOURCE", "local")
    cmd = server_command(app_dir, studies, bundle, host=host, port=port, conf=conf)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    raise SystemExit(subprocess.call(cmd, env=env))
