"""Serving a bundle with MONAI Label's ``monaibundle`` app (networks/label/, ``make label``).

The server test installs MONAI Label into its own environment ``.venv-label`` with ``make label-install``
(a no-op when up to date; about 2 minutes from nothing), lays out an app serving ``synapse_bisegmamba``
(tiny network, coarse grid: a CPU test) on a studies folder holding the real CT fixture and a synthetic
case, both labelled, starts ``monailabel start_server`` on 127.0.0.1, and runs ``POST /infer`` on the CT
(checking the label's grid) and ``POST /train`` for one epoch on the two labelled studies, as 3D Slicer's
MONAI Label module does. When the install fails for lack of network the test is skipped with the reason.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from networks.bundle.synthetic import make_case
from networks.label import server_command
from networks.label.transforms import Spacingd

from support import skip_if_offline

REPO = Path(__file__).resolve().parent.parent
REAL_CT = REPO / "tests" / "data" / "abdomen_ct_example"
LABEL_VENV = Path(os.environ.get("LABEL_VENV", str(REPO / ".venv-label"))).resolve()
BUNDLE = "synapse_bisegmamba"
# a CPU-sized network and grid; the rest of the bundle as shipped
APP_OVERRIDES = {"filters": [4, 8, 8, 8, 8, 8], "patch_size": [16, 64, 64], "pixdim": [3.0, 2.0, 2.0],
                 "epoch_length": 2, "batch_size": 1, "num_workers": 0, "cache_rate": 0.0, "val_interval": 1,
                 "sw_batch_size": 4, "sw_overlap": 0.25}


def test_spacingd_ignores_string_entries_that_monai_label_adds(tmp_path):
    """MONAI 1.6's Spacingd updates every ``image_*`` entry of a NIfTI image's data as a dict; MONAI Label's
    requests carry ``image_path`` (a string). The bundles' inference config uses networks.label.transforms.Spacingd."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
    from monai.transforms import Spacingd as MonaiSpacingd

    path = str(REAL_CT / "abdomen_ct.nii.gz")
    load = Compose([LoadImaged("image", image_only=False), EnsureChannelFirstd("image")])
    data = load({"image": path, "image_path": path})
    with pytest.raises(AttributeError, match="'str' object has no attribute 'update'"):
        MonaiSpacingd("image", pixdim=[6.0, 6.0, 6.0])(dict(data))
    out = Spacingd("image", pixdim=[6.0, 6.0, 6.0])(dict(data))
    assert out["image_path"] == path and tuple(out["image"].shape[1:]) == (62, 51, 15)
    assert out["image_meta_dict"]["filename_or_obj"] == path
    inverted = Spacingd("image", pixdim=[6.0, 6.0, 6.0])
    back = inverted.inverse(inverted(dict(data)))
    assert tuple(back["image"].shape) == tuple(data["image"].shape)
    inference = json.loads((REPO / "bundles" / BUNDLE / "configs" / "inference.json").read_text())
    targets = [t["_target_"] for t in inference["preprocessing"]["transforms"]]
    assert "networks.label.transforms.Spacingd" in targets and "Spacingd" not in targets
    # MONAI Label writes the label itself: the config's postprocessing writes no file
    assert [t["_target_"] for t in inference["postprocessing"]["transforms"]] == ["Invertd", "AsDiscreted"]


# ------------------------------------------------------------------ request guard (networks/label/guard.py)

FAKE_MAIN = """
class MONAILabelApp:
    def infer(self, request, datastore=None):
        return self.run(request)


class MyApp(MONAILabelApp):
    _infers = {"synapse_bisegmamba": object()}

    def __init__(self, ids, run):
        self.ids, self.run = ids, run

    def datastore(self):
        ids = self.ids

        class Store:
            def get_image_uri(self, image_id):
                return f"/studies/{image_id}.nii.gz" if image_id in ids else ""

        return Store()
"""


def _guarded_app(tmp_path, monkeypatch, run):
    """The fake sample app laid out by prepare_app (which appends the guard to main.py), then loaded."""
    import networks.label as label

    sample = tmp_path / "sample"
    sample.mkdir()
    (sample / "main.py").write_text(FAKE_MAIN)
    monkeypatch.setattr(label, "monaibundle_app", lambda: sample)
    app = label.prepare_app(tmp_path / "app", BUNDLE)
    label.prepare_app(tmp_path / "app", BUNDLE)  # again: the guard is appended once
    text = (app / "main.py").read_text()
    assert text.count("_guard_app(globals())") == 1
    namespace = {}
    exec(compile(text, str(app / "main.py"), "exec"), namespace)
    return namespace["MyApp"](["abdomen_ct"], run)


def _upload(suffix=".nii.gz"):
    import tempfile

    f = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)
    f.write(b"upload")
    f.close()
    return f.name


def test_guard_answers_4xx_with_the_reason_and_removes_failed_uploads(tmp_path, monkeypatch):
    from networks.bundle.validation import CaseError

    def run(request):
        if request.get("fail") == "case":
            try:
                raise CaseError(request["image"], "finite", "12 NaN/Inf voxel(s)")
            except CaseError as e:
                raise RuntimeError("applying transform <ValidateCased>") from e
        if request.get("fail"):
            raise RuntimeError("network failed")
        return "label.nii.gz", {}

    app = _guarded_app(tmp_path, monkeypatch, run)
    assert app.infer({"model": BUNDLE, "image": "abdomen_ct"}) == ("label.nii.gz", {})
    for request, status, text in [
        ({"model": "nope", "image": "abdomen_ct"}, 404, f"unknown model 'nope'; this server serves: {BUNDLE}"),
        ({"image": "abdomen_ct"}, 400, "no model given"),
        ({"model": BUNDLE, "image": "missing_id"}, 404, "no image 'missing_id'"),
    ]:
        with pytest.raises(Exception) as e:
            app.infer(request)
        assert e.value.status_code == status and text in e.value.detail
    upload = _upload()
    with pytest.raises(Exception) as e:
        app.infer({"model": BUNDLE, "image": upload, "fail": "case"})
    assert e.value.status_code == 422 and e.value.detail == f"{upload}: finite: 12 NaN/Inf voxel(s)"
    assert not os.path.exists(upload)  # the failed request's upload is gone
    upload = _upload()
    with pytest.raises(RuntimeError, match="network failed"):
        app.infer({"model": BUNDLE, "image": upload, "fail": True})
    assert not os.path.exists(upload)
    upload = _upload()
    app.infer({"model": BUNDLE, "image": upload})
    assert os.path.exists(upload)  # success: MONAI Label removes it after answering
    os.remove(upload)


# ------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def label_python():
    start = time.time()
    r = subprocess.run(["make", "label-install", f"LABEL_VENV={LABEL_VENV}"], cwd=str(REPO), capture_output=True,
                       text=True, timeout=1800)
    if r.returncode != 0:
        out = r.stdout + r.stderr
        skip_if_offline(out, "MONAI Label could not be installed")
        raise AssertionError(f"make label-install failed:\n{out[-4000:]}")
    print(f"\nmake label-install: {time.time() - start:.0f} s")
    return str(LABEL_VENV / "bin" / "python")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, data=None, headers=None, method=None, timeout=600):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def _multipart(fields):
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                    for k, v in fields.items()) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _studies(folder):
    """Two labelled studies (labels in labels/final/, where MONAI Label keeps submitted labels)."""
    final = folder / "labels" / "final"
    final.mkdir(parents=True)
    shutil.copyfile(REAL_CT / "abdomen_ct.nii.gz", folder / "abdomen_ct.nii.gz")
    shutil.copyfile(REAL_CT / "abdomen_ct_label.nii.gz", final / "abdomen_ct.nii.gz")
    image, label, affine = make_case("synapse", seed=0)
    nib.save(nib.Nifti1Image(image, affine), str(folder / "synthetic_000.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(final / "synthetic_000.nii.gz"))


@pytest.fixture
def server(label_python, tmp_path):
    """A MONAI Label server on 127.0.0.1 serving the bundle (tiny untrained weights); yields (URL, app, log)."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / BUNDLE / "configs" / "inference.json"))
    parser.update({"filters": APP_OVERRIDES["filters"]})
    torch.manual_seed(0)
    weights = tmp_path / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), weights)
    studies, app = tmp_path / "studies", tmp_path / "app"
    _studies(studies)
    r = subprocess.run([label_python, "-m", "networks.label", "prepare_app", str(app), BUNDLE, "--weights", str(weights),
                        "--overrides", json.dumps(APP_OVERRIDES)], cwd=str(tmp_path), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["NETWORKS_SCAN_BACKEND"] = "torch"  # no C++ build of the fused CPU scan inside the test's time
    (tmp_path / "tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmp")  # where MONAI Label writes uploads: checked for leftovers
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(server_command(app, studies, BUNDLE, host="127.0.0.1", port=port, python=label_python),
                            cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                _request(f"{url}/info/", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError("server did not start:\n" + (tmp_path / "server.log").read_text()[-4000:])
                time.sleep(1)
        yield url, app, tmp_path / "server.log"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its training subprocesses
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(20)
        log.close()


@pytest.mark.slow
def test_monai_label_infer_and_train(server, tmp_path):
    url, app, log = server
    info = json.loads(_request(f"{url}/info/")[1])
    model = info["models"][BUNDLE]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"]["liver"] == 6 and model["labels"]["aorta"] == 8 and len(model["labels"]) == 13
    assert BUNDLE in info["trainers"]

    # auto-segmentation of a study, as 3D Slicer asks for it
    body, headers = _multipart({"params": json.dumps({"device": "cpu"})})
    status, content = _request(f"{url}/infer/{BUNDLE}?image=abdomen_ct&output=image", body, headers, "POST")
    assert status == 200
    (tmp_path / "label.nii.gz").write_bytes(content)
    pred, ref = nib.load(str(tmp_path / "label.nii.gz")), nib.load(str(REAL_CT / "abdomen_ct.nii.gz"))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-4)
    values = np.unique(np.asarray(pred.dataobj))
    assert values.min() >= 0 and values.max() <= 13
    assert not (app / "model" / BUNDLE / "predictions").exists()  # the bundle itself wrote nothing

    # one epoch of training on the two labelled studies (asynchronous, as from Slicer), then inference again
    model_pt = app / "model" / BUNDLE / "models" / "model.pt"
    before = model_pt.read_bytes()
    request = {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False}
    status, _ = _request(f"{url}/train/{BUNDLE}", json.dumps(request).encode(), {"Content-Type": "application/json"}, "POST")
    assert status == 200
    deadline = time.time() + 300
    while True:
        task = json.loads(_request(f"{url}/train/")[1])  # the latest training task
        if task.get("status") not in ("SUBMITTED", "RUNNING") or time.time() > deadline:
            break
        time.sleep(2)
    text = log.read_text()
    assert task.get("status") == "DONE", (task, text[-4000:])
    assert "Epoch: 1/1, Iter: 2/2" in text and "Total Records for Training: 1" in text
    assert model_pt.read_bytes() != before  # the best (only) epoch's weights, written by the bundle
    status, content = _request(f"{url}/infer/{BUNDLE}?image=synthetic_000&output=image", body, headers, "POST")
    assert status == 200
    (tmp_path / "label2.nii.gz").write_bytes(content)
    assert nib.load(str(tmp_path / "label2.nii.gz")).shape == make_case("synapse", seed=0)[0].shape


def _post_file(url, name, content):
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{{}}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return _status(url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def _status(url, data=b"", headers=None):
    try:
        status, content = _request(url, data, headers or {}, "POST")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    return status, content


@pytest.mark.slow
def test_monai_label_bad_requests_answer_4xx_and_leave_no_upload(server, tmp_path):
    url, app, log = server
    body, headers = _multipart({"params": json.dumps({"device": "cpu"})})
    status, text = _status(f"{url}/infer/no_such_model?image=abdomen_ct", body, headers)
    assert status == 404 and "unknown model 'no_such_model'" in text and BUNDLE in text
    status, text = _status(f"{url}/infer/{BUNDLE}?image=no_such_image", body, headers)
    assert status == 404 and "no image 'no_such_image'" in text
    image, _, affine = make_case("synapse", seed=1)
    nan = image.astype(np.float32)
    nan[5:10, 5:10, 1:3] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), str(tmp_path / "nan.nii.gz"))
    status, text = _post_file(f"{url}/infer/{BUNDLE}?output=image", "nan.nii.gz", (tmp_path / "nan.nii.gz").read_bytes())
    assert status == 422 and "finite: 50 NaN/Inf voxel(s)" in text, (status, text, log.read_text()[-3000:])
    status, text = _post_file(f"{url}/infer/{BUNDLE}?output=image", "broken.nii.gz", b"not an image")
    assert status >= 400
    assert list((tmp_path / "tmp").glob("*.nii*")) == []  # failed uploads removed
    status, text = _request(f"{url}/info/")  # the server still answers
    assert status == 200

