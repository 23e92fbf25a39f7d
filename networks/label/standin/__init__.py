"""Holds the stand-in ``torchvision`` package (see ``torchvision/__init__.py`` here); put on sys.path by a .pth file."""
