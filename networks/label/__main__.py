"""``python -m networks.label serve BUNDLE STUDIES [--weights PATH] [--port N]`` (see networks/label/__init__.py)."""

import fire

from networks.label import install_standin, prepare_app, serve

if __name__ == "__main__":
    fire.Fire({"serve": serve, "prepare_app": prepare_app, "install_standin": install_standin})
