"""The two names monailabel imports from ``torchvision.utils``; calling either raises a clear error."""


def _unavailable(name):
    def fn(*args, **kwargs):
        raise RuntimeError(
            f"torchvision.utils.{name} is not available: this environment has a stand-in torchvision "
            "(networks/label/standin), enough for MONAI Label's server to import. Install a torchvision that "
            "matches your torch to use debug image grids."
        )

    fn.__name__ = name
    return fn


make_grid = _unavailable("make_grid")
save_image = _unavailable("save_image")
