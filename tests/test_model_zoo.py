"""The twelve bundles pass the MONAI model zoo's own CI checks, offline.

* metadata: MONAI's ``verify_metadata`` against the schema the metadata names, vendored in
  ``tests/data/model_zoo/`` (see its README for source and version), placed where ``verify_metadata``
  would download it, so nothing is fetched;
* the zoo's bundle-directory check (``ci/verify_bundle.py`` of Project-MONAI/model-zoo: necessary files,
  preferred files, version listed in the changelog) on a temporary copy with fake weights written as the
  zoo's CI writes them (the network's ``state_dict``), and the zoo's file-size rule (its pre-commit hook
  ``check-added-large-files --maxkb=1024``) on every committed bundle file;
* the zoo's JSON formatting hook ``pretty-format-json --indent=4 --no-sort-keys`` (pre-commit-hooks'
  own ``main``, in check mode) on every generated JSON file;
* the bundle README follows the zoo's README template, and every bundle carries ``docs/data_license.txt``.

``verify_net_in_out`` and ``ConfigWorkflow.check_properties()`` for ``train.json``,
``train.json`` + ``evaluate.json`` and ``inference.json`` run in ``tests/test_bundles.py``
(``test_verify_net_in_out``, ``run_workflow``); ``ckpt_export`` in ``tests/test_export.py``.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata
from pre_commit_hooks import pretty_format_json

from networks import bundle_gen

REPO = Path(__file__).resolve().parent.parent
BUNDLES = REPO / "bundles"
SCHEMAS = REPO / "tests" / "data" / "model_zoo"
NAMES = bundle_gen.bundle_names()
ZOO_JSON_HOOK_ARGS = ["--indent=4", "--no-sort-keys"]  # the zoo's pretty-format-json arguments
MAX_KB = 1024  # the zoo's check-added-large-files --maxkb
# README sections of the zoo's template, in order (as the zoo's bundles lay them out)
README_SECTIONS = ["# Model Overview", "## Description", "## Data", "### Preprocessing", "## Training configuration",
                   "### Input", "### Output", "## Performance", "## System configuration", "## MONAI Bundle Commands",
                   "# References", "# License"]


def verify_bundle_directory(bundle: Path) -> None:
    """The model zoo's ``verify_bundle_directory`` and ``verify_version_changes`` (``ci/verify_bundle.py``),
    vendored: ValueError naming the first missing file or the version absent from the changelog."""
    for rel in ("configs/metadata.json", "LICENSE"):  # necessary_files_list
        if not (bundle / rel).exists():
            raise ValueError(f"necessary file {rel} is not existing.")
    if not any((bundle / "configs" / f"inference.{ext}").exists() for ext in ("json", "yaml", "yml")):
        raise ValueError("inference config file is not existing.")
    if not (bundle / "models" / "model.pt").exists():  # preferred_files_list
        raise ValueError("necessary file models/model.pt is not existing.")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for key in ("version", "changelog"):
        if key not in meta:
            raise ValueError(f"'{key}' is missing in configs/metadata.json of bundle: {bundle.name}.")
    if meta["version"] not in meta["changelog"]:
        raise ValueError(f"version number: {meta['version']} is missing in 'changelog' in configs/metadata.json")


def write_fake_weights(bundle: Path, filters=None) -> Path:
    """As the zoo's CI (``_produce_fake_weights``): the inference network's freshly initialised state dict
    (``filters``: a smaller network for speed, the same layers)."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    if filters is not None:
        parser["filters"] = filters
    path = bundle / "models" / "model.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def test_vendored_schema_is_the_one_the_bundles_name():
    readme = (SCHEMAS / "README.md").read_text()
    for name in NAMES:
        url = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())["schema"]
        assert (SCHEMAS / Path(url).name).is_file(), url
        assert url in readme  # source recorded next to the vendored file


@pytest.mark.parametrize("name", NAMES)
def test_metadata_passes_the_zoo_schema(name, tmp_path):
    meta = BUNDLES / name / "configs" / "metadata.json"
    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMAS / Path(json.loads(meta.read_text())["schema"]).name, schema)  # "downloaded" already
    verify_metadata(meta_file=str(meta), filepath=str(schema))


def test_metadata_check_fails_on_a_missing_required_field(tmp_path):
    meta = json.loads((BUNDLES / NAMES[0] / "configs" / "metadata.json").read_text())
    del meta["required_packages_version"]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    shutil.copy(SCHEMAS / Path(meta["schema"]).name, tmp_path / "schema.json")
    with pytest.raises(ValueError, match="required_packages_version"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(tmp_path / "schema.json"))


def test_generated_json_passes_the_zoo_formatting_hook(tmp_path):
    files = sorted(str(p) for name in NAMES for p in (BUNDLES / name / "configs").glob("*.json"))
    assert len(files) == 12 * len(bundle_gen.JSON_FILES)
    assert pretty_format_json.main(ZOO_JSON_HOOK_ARGS + files) == 0
    # the hook does reject what it would rewrite (the check can fail)
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps({"b": [1, 2], "a": "\u00b1"}, indent=4, ensure_ascii=False) + "\n")
    assert pretty_format_json.main(ZOO_JSON_HOOK_ARGS + [str(compact)]) == 1


def test_bundle_files_respect_the_zoo_size_limit():
    for name in NAMES:
        for path in (BUNDLES / name).rglob("*"):
            if path.is_file():
                assert path.stat().st_size <= MAX_KB * 1024, f"{path} is over {MAX_KB} KB"


@pytest.mark.parametrize("name", NAMES)
def test_bundle_directory_check_with_fake_weights(name, tmp_path):
    bundle = tmp_path / name
    shutil.copytree(BUNDLES / name, bundle)
    with pytest.raises(ValueError, match="models/model.pt"):  # as the zoo's check says without weights
        verify_bundle_directory(bundle)
    write_fake_weights(bundle, filters=[4] * len(json.loads((bundle / "configs" / "train.json").read_text())["filters"]))
    verify_bundle_directory(bundle)
    (bundle / "LICENSE").unlink()
    with pytest.raises(ValueError, match="LICENSE"):
        verify_bundle_directory(bundle)


@pytest.mark.parametrize("name", NAMES)
def test_readme_follows_the_zoo_template_and_data_licence_is_shipped(name):
    readme = (BUNDLES / name / "docs" / "README.md").read_text()
    headings = [line for line in readme.splitlines() if line.startswith("#") and not line.startswith("#!")]
    found = [h for h in headings if h in README_SECTIONS]
    assert found == README_SECTIONS, f"README sections {found}"
    assert "docs/data_license.txt" in readme and "python -m networks.export" in readme
    licence = (BUNDLES / name / "docs" / "data_license.txt").read_text()
    expected = {"brats": "CC BY-SA 4.0", "synapse": "synapse.org", "acdc": "You must refer to this citation"}
    assert expected[name.split("_")[0]] in licence


def test_train_config_names_an_output_dir():
    for name in NAMES:
        train = json.loads((BUNDLES / name / "configs" / "train.json").read_text())
        assert "output_dir" in train
