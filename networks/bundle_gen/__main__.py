"""``python -m networks.bundle_gen [--out_dir DIR] [--check_only]``: see :mod:`networks.bundle_gen`."""

import fire

from . import main

if __name__ == "__main__":
    fire.Fire(main)
