"""Release artifacts (networks/dist.py): the wheel, one ``<bundle>_v<version>.zip`` per bundle and
``model_info.json``, served from a local HTTP server on 127.0.0.1.

Fast tests check the archives, the index, the weights' two ways in (inside the archive or through
``large_files.json``), and what a corrupted or truncated archive leaves behind with ``monai.bundle download``
and with the verified ``networks.dist fetch``. The ``slow`` tests install the wheel in a fresh virtual
environment (no checkout on its path) and, from there, download a bundle with ``monai.bundle download``,
segment the real CT fixture with its ``inference.json`` using weights from a short training run, and load
the network with ``monai.bundle.load``.
"""

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from networks import bundle_gen, dist
from networks.bundle.synthetic import make_dataset, tiny_overrides

from support import skip_if_offline

REPO = Path(__file__).resolve().parent.parent
REAL_CT = REPO / "tests" / "data" / "abdomen_ct_example"
INCLUDED = "synapse_bisegmamba"  # weights inside the archive (trained briefly here)
EXTERNAL = "synapse_segmamba"  # weights published beside it, through large_files.json
TINY = tiny_overrides("synapse")


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """(folder, base URL) of an HTTP server on 127.0.0.1 serving that folder; stopped after the session."""
    root = tmp_path_factory.mktemp("served")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """models/model.pt of a short training run (tiny network, one epoch) on synthetic Synapse-like data."""
    data, out = tmp_path_factory.mktemp("train_data"), tmp_path_factory.mktemp("train_out")
    make_dataset("synapse", str(data))
    conf = REPO / "bundles" / INCLUDED / "configs"
    wf = ConfigWorkflow(config_file=str(conf / "train.json"), meta_file=str(conf / "metadata.json"),
                        logging_file=str(conf / "logging.conf"), workflow_type="train",
                        # the grid and window of the inference test below (recorded in model.pt, which
                        # inference then rebuilds from)
                        **tiny_overrides("synapse", bundle_root=str(out), dataset_dir=str(data),
                                         pixdim=[3.0, 2.0, 2.0], patch_size=[32, 128, 128]))
    wf.initialize()
    try:
        wf.run()
    finally:
        wf.finalize()
    assert (out / "models" / "model.pt").is_file()
    return out / "models" / "model.pt"


@pytest.fixture(scope="session")
def untrained(tmp_path_factory):
    """A tiny untrained state dict for the bundle whose weights go through large_files.json."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / EXTERNAL / "configs" / "inference.json"))
    parser.update({"filters": TINY["filters"]})
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("untrained") / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


@pytest.fixture(scope="session")
def dist_dir(served, trained, untrained):
    """`make dist` into the served folder, with weights for two bundles; returns (folder, URL, index)."""
    root, url = served
    dist.build(out=str(root), weights={INCLUDED: str(trained), EXTERNAL: str(untrained)}, weights_base_url=None)
    # the external one again, its weights published beside the archive and referenced by URL
    dist.build(out=str(root), bundles=EXTERNAL, weights=f"{EXTERNAL}={untrained}", weights_base_url=url, wheel=False)
    return root, url, json.loads((root / "model_info.json").read_text())


def _version(name):
    return json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text())["version"]


# ------------------------------------------------------------------ archives and index


def test_archives_index_and_wheel(dist_dir, trained, untrained):
    root, _, index = dist_dir
    package = dist.package_version()
    assert (root / f"taming_mambas_bundles-{package}-py3-none-any.whl").is_file()
    assert sorted(v["name"] for v in index.values()) == sorted(bundle_gen.bundle_names())
    sums = dict(line.split("  ")[::-1] for line in (root / "SHA256SUMS").read_text().splitlines())
    for key, entry in index.items():
        name, version = entry["name"], entry["version"]
        assert key == f"{name}_v{version}" and entry["file"] == f"{name}_v{version}.zip"
        zpath = root / entry["file"]
        assert entry["size"] == zpath.stat().st_size and entry["sha256"] == sha256(zpath) == sums[entry["file"]]
        with zipfile.ZipFile(zpath) as zf:
            assert zf.testzip() is None
            names = zf.namelist()
            assert {n.split("/")[0] for n in names} == {name}  # one top-level folder
            assert names[-1] == f"{name}/configs/inference.json"  # see dist.LAST_MEMBERS
            meta = json.loads(zf.read(f"{name}/configs/metadata.json"))
            for rel in ("configs/train.json", "configs/inference.json", "docs/README.md", "LICENSE"):
                assert zf.read(f"{name}/{rel}").decode() == (REPO / "bundles" / name / rel).read_text()
            assert meta["version"] == version == _version(name) and version in meta["changelog"]
            assert max(meta["changelog"], key=lambda v: tuple(map(int, v.split(".")))) == version
            assert meta["required_packages_version"][dist.DIST_NAME] == package
            if name == INCLUDED:
                assert entry["weights"] == "included"
                assert entry["weights_fit_config"] is False  # tiny filters: inference needs --filters
                assert zf.read(f"{name}/models/model.pt") == trained.read_bytes()
            elif name == EXTERNAL:
                assert entry["weights"] == "large_files" and f"{name}/models/model.pt" not in names
                lf = json.loads(zf.read(f"{name}/large_files.json"))["large_files"]
                assert lf == [{"path": "models/model.pt", "url": entry["weights_url"], "hash_val": sha256(untrained),
                               "hash_type": "sha256"}]
                assert entry["weights_url"].endswith("/" + entry["weights_file"])
                assert (root / entry["weights_file"]).read_bytes() == untrained.read_bytes()
            else:
                assert entry["weights"] == "none" and not [n for n in names if "/models/" in n]


def test_build_is_reproducible_and_checks_its_inputs(tmp_path, trained):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        dist.build(out=str(out), bundles=INCLUDED, weights={INCLUDED: str(trained)}, wheel=False)
    zname = f"{INCLUDED}_v{_version(INCLUDED)}.zip"
    assert (a / zname).read_bytes() == (b / zname).read_bytes()
    assert not [p for p in a.iterdir() if p.name.startswith(".")]  # no temp files left

    not_weights = tmp_path / "not_weights.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, not_weights)
    with pytest.raises(ValueError, match="plain state_dict"):
        dist.build(out=str(tmp_path / "c"), bundles=INCLUDED, weights={INCLUDED: str(not_weights)}, wheel=False)
    with pytest.raises(ValueError, match="unknown bundle"):
        dist.build(out=str(tmp_path / "c"), bundles="synapse_nope", wheel=False)

    meta = json.loads((REPO / "bundles" / INCLUDED / "configs" / "metadata.json").read_text())
    assert dist.check_metadata(INCLUDED, meta, dist.package_version()) == meta["version"]
    with pytest.raises(ValueError, match="no changelog entry"):
        dist.check_metadata(INCLUDED, {**meta, "version": "9.9.9"})
    with pytest.raises(ValueError, match="not the newest"):
        dist.check_metadata(INCLUDED, {**meta, "changelog": {**meta["changelog"], "9.0.0": "later"}})
    with pytest.raises(ValueError, match="the package being built is 0.0.1"):
        dist.check_metadata(INCLUDED, meta, "0.0.1")


# ------------------------------------------------------------------ damaged downloads


def _damaged(root, entry, how):
    """A copy of the served archive (and index) under root/<how>/, truncated or with bytes flipped."""
    folder = root / how
    folder.mkdir(exist_ok=True)
    shutil.copyfile(root / "model_info.json", folder / "model_info.json")
    data = bytearray((root / entry["file"]).read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        for i in range(len(data) // 2, len(data) // 2 + 32):
            data[i] ^= 0xFF
    (folder / entry["file"]).write_bytes(bytes(data))
    return folder


@pytest.mark.parametrize("how", ["truncated", "corrupted"])
def test_fetch_rejects_damaged_archives_and_leaves_nothing(dist_dir, how, tmp_path):
    root, url, index = dist_dir
    entry = index[f"{INCLUDED}_v{_version(INCLUDED)}"]
    _damaged(root, entry, how)
    target = tmp_path / "bundles"
    with pytest.raises(dist.ArchiveError, match="does not match"):
        dist.fetch(f"{url}/{how}/{entry['file']}", bundle_dir=str(target))
    assert list(target.iterdir()) == []  # no archive, no temp folder, no half bundle
    dist.fetch(f"{url}/{entry['file']}", bundle_dir=str(target))  # the good one, then, works
    assert (target / INCLUDED / "models" / "model.pt").is_file()
    assert [p.name for p in target.iterdir()] == [INCLUDED]


def test_fetch_gets_and_checks_large_files(dist_dir, tmp_path, untrained):
    root, url, index = dist_dir
    entry = index[f"{EXTERNAL}_v{_version(EXTERNAL)}"]
    dist.fetch(f"{url}/{entry['file']}", bundle_dir=str(tmp_path / "ok"))
    assert (tmp_path / "ok" / EXTERNAL / "models" / "model.pt").read_bytes() == untrained.read_bytes()

    wfile = root / entry["weights_file"]
    good = wfile.read_bytes()
    try:
        wfile.write_bytes(good[:-10] + b"0123456789")  # tampered weights on the server
        with pytest.raises(dist.ArchiveError, match="hash check"):
            dist.fetch(f"{url}/{entry['file']}", bundle_dir=str(tmp_path / "bad"))
        assert list((tmp_path / "bad").iterdir()) == []
    finally:
        wfile.write_bytes(good)


def _monai(*args, cwd=None, python=sys.executable, env=None):
    return subprocess.run([python, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_monai_download_of_a_truncated_archive_fails_without_extracting(dist_dir, tmp_path):
    root, url, index = dist_dir
    entry = index[f"{INCLUDED}_v{_version(INCLUDED)}"]
    _damaged(root, entry, "truncated")
    r = _monai("download", "--name", INCLUDED, "--url", f"{url}/truncated/{entry['file']}", "--bundle_dir",
               str(tmp_path), "--progress", "False")
    assert r.returncode != 0 and "BadZipFile: File is not a zip file" in r.stderr
    assert not (tmp_path / INCLUDED).exists()


@pytest.mark.filterwarnings("ignore:No hash value provided")
def test_monai_download_of_a_corrupted_archive_leaves_no_runnable_half_bundle(dist_dir, tmp_path):
    """``monai.bundle download`` extracts member by member without checking the archive, and a later run skips
    extracting into the non-empty folder. Damage each member in turn: every file extracted before the damage
    is whole, and the configs after it are missing, so no config that loads uses a damaged file."""
    from monai.bundle import download

    root, url, index = dist_dir
    entry = index[f"{INCLUDED}_v{_version(INCLUDED)}"]
    good = (root / entry["file"]).read_bytes()
    with zipfile.ZipFile(root / entry["file"]) as zf:
        infos = zf.infolist()
        originals = {i.filename: zf.read(i) for i in infos}
    for k, info in enumerate(infos):
        data = bytearray(good)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        mid = start + info.compress_size // 2
        for i in range(mid, mid + 8):
            data[i] ^= 0xFF
        src = tmp_path / f"damaged{k}" / entry["file"]
        src.parent.mkdir()
        src.write_bytes(bytes(data))
        out = tmp_path / f"out{k}"
        with pytest.raises(Exception):
            download(name=INCLUDED, url=src.as_uri(), bundle_dir=str(out), progress=False)
        for j, other in enumerate(infos):
            p = out / other.filename
            if j < k:
                assert p.read_bytes() == originals[other.filename], (info.filename, other.filename)
            elif j > k:
                assert not p.exists(), (info.filename, other.filename)
            elif p.exists() and p.suffix == ".json":
                with pytest.raises(Exception):
                    json.loads(p.read_bytes())
        assert not (out / INCLUDED / "configs" / "inference.json").is_file() or k == len(infos) - 1


def test_monai_download_large_files_rejects_a_wrong_hash(dist_dir, tmp_path, untrained):
    root, url, index = dist_dir
    entry = index[f"{EXTERNAL}_v{_version(EXTERNAL)}"]
    with zipfile.ZipFile(root / entry["file"]) as zf:
        zf.extractall(tmp_path)
    bundle = tmp_path / EXTERNAL
    r = _monai("download_large_files", "--bundle_path", str(bundle))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sha256(bundle / "models" / "model.pt") == entry["weights_sha256"]

    (bundle / "models" / "model.pt").unlink()
    wfile = root / entry["weights_file"]
    good = wfile.read_bytes()
    try:
        wfile.write_bytes(good[: len(good) // 2])
        r = _monai("download_large_files", "--bundle_path", str(bundle))
    finally:
        wfile.write_bytes(good)
    assert r.returncode != 0
    assert "HashCheckError: sha256 hash check of downloaded file failed" in r.stderr
    assert not (bundle / "models" / "model.pt").exists()


# ------------------------------------------------------------------ a clean environment


@pytest.fixture(scope="session")
def fresh_env(dist_dir, tmp_path_factory):
    """A new virtual environment with only the wheel and its dependencies (torch: the CPU build)."""
    root, _, _ = dist_dir
    wheel = next(root.glob("taming_mambas_bundles-*.whl"))
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["NETWORKS_SCAN_BACKEND"] = "torch"  # no C++ build of the fused CPU scan inside the test's time
    start = time.time()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check"]
    torch_version = torch.__version__.split("+")[0]
    steps = [[*pip, "--no-deps", "--no-index", f"torch=={torch_version}"], [*pip, str(wheel), f"torch=={torch_version}"]]
    for i, cmd in enumerate(steps):
        r = subprocess.run(cmd, env=env, cwd=str(venv.parent), capture_output=True, text=True, timeout=900)
        if r.returncode != 0 and i == 0:  # no local wheel: the CPU index
            r = subprocess.run([*pip, "--no-deps", f"torch=={torch_version}", "--index-url",
                                "https://download.pytorch.org/whl/cpu"], env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            out = r.stdout + r.stderr
            skip_if_offline(out, "cannot install the wheel's dependencies")
            raise AssertionError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    print(f"\nfresh environment installed in {time.time() - start:.0f} s")
    return py, env, venv.parent


@pytest.mark.slow
def test_fresh_env_download_infer_and_load(fresh_env, dist_dir, trained, tmp_path):
    py, env, _ = fresh_env
    root, url, index = dist_dir
    version = _version(INCLUDED)
    work = tmp_path / "work"  # the current folder: no checkout anywhere on the path
    work.mkdir()
    r = subprocess.run([py, "-c", "import networks, monai, sys; print(networks.__file__); print(sys.path)"],
                       cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and str(REPO) not in r.stdout and "site-packages" in r.stdout.splitlines()[0], r.stdout

    bundles = tmp_path / "bundles"
    r = _monai("download", "--name", INCLUDED, "--url", f"{url}/{INCLUDED}_v{version}.zip", "--bundle_dir",
               str(bundles), "--progress", "False", python=py, cwd=work, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    bundle = bundles / INCLUDED
    assert (bundle / "models" / "model.pt").read_bytes() == trained.read_bytes()

    # its inference.json on the real CT (tiny network, grid and window of the training run, from model.pt)
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps([{"image": str(REAL_CT / "abdomen_ct.nii.gz"), "id": "abdomen_ct"}]))
    pred_dir = tmp_path / "pred"
    args = ["run", "--config_file", str(bundle / "configs" / "inference.json"),
            "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
            "--datalist", str(datalist), "--output_dir", str(pred_dir), "--sw_overlap", "0.25",
            "--num_workers", "0", "--sw_batch_size", "1"]
    r = _monai(*args, python=py, cwd=work, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    pred, ref = nib.load(str(pred_dir / "abdomen_ct_seg.nii.gz")), nib.load(str(REAL_CT / "abdomen_ct.nii.gz"))
    assert pred.shape == ref.shape[:3] and np.array_equal(pred.affine, ref.affine)
    assert pred.get_data_dtype() == np.uint8
    values = np.unique(np.asarray(pred.dataobj))
    assert values.min() >= 0 and values.max() < 14

    # monai.bundle.load: the bundle's network with the trained weights
    out = tmp_path / "loaded.pt"
    script = (
        "import sys, torch, monai.bundle\n"
        f"net = monai.bundle.load(name={INCLUDED!r}, bundle_dir={str(bundles)!r}, workflow_type='inference', "
        f"device='cpu', net_override={{'filters': {TINY['filters']!r}}})\n"
        "assert type(net).__name__ == 'BiSegMamba', type(net)\n"
        f"torch.save(net.state_dict(), {str(out)!r})\n")
    r = subprocess.run([py, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded, expected = torch.load(out, weights_only=True), torch.load(trained, weights_only=True)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_fresh_env_weights_through_large_files(fresh_env, dist_dir, untrained, tmp_path):
    py, env, _ = fresh_env
    root, url, index = dist_dir
    entry = index[f"{EXTERNAL}_v{_version(EXTERNAL)}"]
    bundles = tmp_path / "bundles"
    r = _monai("download", "--name", EXTERNAL, "--url", f"{url}/{entry['file']}", "--bundle_dir", str(bundles),
               "--progress", "False", python=py, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _monai("download_large_files", "--bundle_path", str(bundles / EXTERNAL), python=py, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (bundles / EXTERNAL / "models" / "model.pt").read_bytes() == untrained.read_bytes()
    # the verified download, from the clean environment too
    r = subprocess.run([py, "-m", "networks.dist", "fetch", "--url", f"{url}/{entry['file']}", "--bundle_dir",
                        str(tmp_path / "fetched")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "fetched" / EXTERNAL / "models" / "model.pt").read_bytes() == untrained.read_bytes()
