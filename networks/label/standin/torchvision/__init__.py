"""Stand-in for ``torchvision`` in the MONAI Label environment (``.venv-label``), not a real torchvision.

monailabel 0.8.5 imports ``torchvision.utils.make_grid`` and ``save_image`` unconditionally at import time
(``monailabel/transform/post.py``, ``monailabel/deepedit/handlers.py``), only to draw debug image grids that
the ``monaibundle`` app never draws. PyPI's torchvision wheels are built against CUDA torch: none imports
beside the CPU torch 2.13.0 the bundles are tested with, and ``pip install torchvision`` replaces torch with a
multi-GB CUDA build. This package is put on ``sys.path`` *after* site-packages by a ``.pth`` file
(``python -m networks.label install_standin``), so a real torchvision, when installed, always wins.

``__version__`` is ``0.0.0`` so that MONAI's version-checked ``optional_import("torchvision", "0.x")`` treats
torchvision as missing; anything that actually calls into it gets a clear error.
"""

__version__ = "0.0.0"
STANDIN = True

from . import utils  # noqa: E402,F401
