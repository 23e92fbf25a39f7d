"""The README's Python example runs as written, and its shell commands name real things."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    for code in blocks:
        namespace = {}
        exec(compile(code, "README.md", "exec"), namespace)
    assert tuple(namespace["y"].shape) == (1, 14, 48, 96, 96)


def test_make_targets_exist():
    targets = set(re.findall(r"^([a-zA-Z][\w-]*):", open(os.path.join(ROOT, "Makefile")).read(), flags=re.M))
    used = set(re.findall(r"`make ([a-z][\w-]*)", README)) | set(re.findall(r"^make ([a-z][\w-]*)", README, flags=re.M))
    assert used and used <= targets, used - targets


def test_bundle_folders_in_readme_exist():
    for name in set(re.findall(r"`((?:brats|synapse|acdc)_[a-z]+)`", README)):
        assert os.path.isdir(os.path.join(ROOT, "bundles", name, "configs")), name


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "make test" in README and re.search(r"^make test$", ci, flags=re.M)
