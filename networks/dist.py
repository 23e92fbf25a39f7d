"""Release artifacts: the ``networks`` wheel and one downloadable archive per bundle (``make dist``).

``python -m networks.dist build --out dist [--weights NAME=PATH,...] [--weights_base_url URL]`` writes:

* ``taming_mambas_bundles-<version>-py3-none-any.whl``: the package every bundle imports (named in each
  bundle's ``metadata.json`` ``required_packages_version``);
* ``<bundle>_v<version>.zip`` per bundle, with one top-level ``<bundle>/`` folder: the layout that
  ``python -m monai.bundle download --name <bundle> --url .../<bundle>_v<version>.zip`` extracts, and the
  file name that its ``--source github --repo <owner>/<repo>/<tag> --name <bundle> --version <version>``
  asks a GitHub release for;
* ``model_info.json``: ``{"<bundle>_v<version>": {name, version, file, sha256, size, weights, ...}}``, and
  ``SHA256SUMS`` for every file written.

Weights (no trained weights exist yet): ``--weights NAME=PATH`` puts ``PATH`` (a plain ``state_dict``) in the
archive as ``models/model.pt``. With ``--weights_base_url URL`` the weights are instead published beside the
archives as ``<bundle>_v<version>_model.pt`` and the archive carries ``large_files.json`` (url + sha256) for
``python -m monai.bundle download_large_files --bundle_path <bundle>``, which rejects a file whose sha256
differs. (JSON rather than ``large_files.yml``: reading YAML needs PyYAML, which a clean install of the wheel
does not have; ``download_large_files`` reads either.) A bundle without weights is archived without
``models/``: train it first.

Every archive and index is written to a temp file and renamed into place, so an interrupted build leaves the
previous complete file or none. The bundles are archived from the generator's output
(``networks.bundle_gen``), after checking that ``bundles/`` is up to date, that each ``version`` is the
newest ``changelog`` entry and that the package version in ``required_packages_version`` is the wheel's.

``python -m networks.dist fetch --url .../<bundle>_v<version>.zip --bundle_dir DIR`` is the verified download:
the archive's sha256 and size are checked against ``model_info.json`` (beside it by default) and its members'
CRCs and layout before anything is extracted; extraction goes to a temp folder renamed to ``DIR/<bundle>``
(with the weights of ``large_files.json`` fetched and checked first), so a corrupted or truncated download
leaves nothing behind. ``monai.bundle download`` checks none of this.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["DIST_NAME", "package_version", "archive_name", "sha256_file", "parse_mapping", "check_metadata",
           "build_wheel", "build_archive", "build", "fetch", "ArchiveError", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DIST_NAME = "taming-mambas-bundles"
INDEX = "model_info.json"
LARGE_FILES = "large_files.json"
# fixed member timestamps: the same inputs give byte-identical archives
ZIP_DATE = (2025, 1, 1, 0, 0, 0)
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


class ArchiveError(RuntimeError):
    """A bundle archive that does not match its index, is not a valid zip, or has an unexpected layout."""


# ------------------------------------------------------------------ helpers


def package_version(setup_cfg: Union[str, Path] = REPO_ROOT / "setup.cfg") -> str:
    """The package version of ``setup.cfg`` (that of the wheel ``build`` writes)."""
    cp = configparser.ConfigParser()
    cp.read(setup_cfg)
    return cp["metadata"]["version"].strip()


def archive_name(name: str, version: str) -> str:
    return f"{name}_v{version}.zip"


def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_mapping(value: Union[None, str, Mapping[str, str], Sequence[str]]) -> Dict[str, str]:
    """``"a=x,b=y"`` / ``["a=x", "b=y"]`` / a dict -> ``{"a": "x", "b": "y"}`` (the form of ``--weights``)."""
    if not value:
        return {}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    items = value.split(",") if isinstance(value, str) else list(value)
    out = {}
    for item in items:
        if "=" not in str(item):
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        k, v = str(item).split("=", 1)
        out[k.strip()] = v.strip()
    return out


@contextlib.contextmanager
def _atomic_path(dest: Path, suffix: str = ".tmp"):
    """Yield a temp path in ``dest``'s folder; on success it is renamed onto ``dest``, else removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _write_text_atomic(dest: Path, text: str) -> None:
    with _atomic_path(dest) as tmp:
        tmp.write_text(text)


def _version_key(v: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def check_metadata(name: str, metadata: Mapping[str, Any], package: Optional[str] = None) -> str:
    """The bundle's version, after checking it is the newest changelog entry and names ``package``'s version."""
    version = str(metadata.get("version", ""))
    if not _VERSION.match(version):
        raise ValueError(f"{name}: metadata version {version!r} is not MAJOR.MINOR.PATCH")
    changelog = metadata.get("changelog") or {}
    if version not in changelog:
        raise ValueError(f"{name}: version {version} has no changelog entry (entries: {', '.join(changelog)})")
    newest = max(changelog, key=_version_key)
    if newest != version:
        raise ValueError(f"{name}: version {version} is not the newest changelog entry ({newest})")
    required = metadata.get("required_packages_version") or {}
    if package is not None and required.get(DIST_NAME) != package:
        raise ValueError(f"{name}: required_packages_version names {DIST_NAME} {required.get(DIST_NAME)!r}, "
                         f"the package being built is {package}")
    return version


# ------------------------------------------------------------------ build


# what the wheel is built from (a clean copy: setuptools' in-tree build/ keeps files deleted since)
WHEEL_SOURCES = ("setup.py", "setup.cfg", "README.md", "networks")


def build_wheel(out: Union[str, Path], source: Union[str, Path] = REPO_ROOT) -> Path:
    """``pip wheel`` of the package (no dependencies) built from a clean copy of ``source``, into ``out``;
    returns the wheel's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".wheel.") as tmp, \
            tempfile.TemporaryDirectory(prefix="wheel-src.") as src:
        for rel in WHEEL_SOURCES:
            p = Path(source) / rel
            if p.is_dir():
                shutil.copytree(p, Path(src) / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info"))
            else:
                shutil.copy2(p, Path(src) / rel)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp, src]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the wheel failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from pip wheel, got {wheels}")
        dest = out / wheels[0].name
        os.replace(wheels[0], dest)
    return dest


# Member order. ``monai.bundle download`` extracts member after member without checking the archive first,
# stops at the first corrupted one (leaving it partly written) and, run again, skips extracting into a
# non-empty folder. The configs a workflow starts from therefore come last, inference.json at the very end:
# in a half-extracted bundle every file that a runnable config uses was extracted whole, and the configs
# after the damage are missing, so nothing half-extracted runs.
LAST_MEMBERS = ("large_files.json", "models/model.pt", "configs/logging.conf", "configs/metadata.json",
                "configs/multi_gpu_train.json", "configs/evaluate.json", "configs/train.json", "configs/inference.json")


def member_rank(rel: str) -> Tuple[int, str]:
    return (LAST_MEMBERS.index(rel) + 1 if rel in LAST_MEMBERS else 0, rel)


def _zip_bytes(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def _zip_file(zf: zipfile.ZipFile, arcname: str, path: Path) -> None:
    info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    with open(path, "rb") as src, zf.open(info, "w") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _load_state_dict_check(path: Path) -> None:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"weights {path}: not a torch file loadable with weights_only=True ({e})") from None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights {path}: expected a plain state_dict (name -> tensor), as models/model.pt")


def _fit_report(state_file: Path, inference_json: str) -> Optional[str]:
    """None when the weights load strictly into the bundle's ``network_def`` as configured, else a summary."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(json.loads(inference_json) if isinstance(inference_json, str) else inference_json)
    expected = {k: tuple(v.shape) for k, v in parser.get_parsed_content("network_def").state_dict().items()}
    got = {k: tuple(v.shape) for k, v in torch.load(state_file, map_location="cpu", weights_only=True).items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if not (missing or unexpected or shapes):
        return None
    first = (missing + unexpected + shapes)[0]
    return (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} differently shaped tensors "
            f"(e.g. {first})")


def build_archive(name: str, files: Mapping[str, str], out: Union[str, Path], package: Optional[str] = None,
                  weights: Optional[Union[str, Path]] = None, weights_base_url: Optional[str] = None) -> Dict[str, Any]:
    """Write ``<out>/<name>_v<version>.zip`` from the bundle's generated ``files`` (relative path -> text);
    returns its ``model_info.json`` entry."""
    out = Path(out)
    metadata = json.loads(files["configs/metadata.json"])
    version = check_metadata(name, metadata, package)
    zname = archive_name(name, version)
    entry: Dict[str, Any] = {"name": name, "version": version, "file": zname, "weights": "none"}
    extra: Dict[str, bytes] = {}
    if weights is not None:
        weights = Path(weights)
        _load_state_dict_check(weights)
        misfit = _fit_report(weights, files["configs/inference.json"])
        if misfit:
            print(f"warning: {name}: the weights {weights} do not fit network_def as configured in inference.json "
                  f"({misfit}): users will need the overrides they were trained with (e.g. --filters)",
                  file=sys.stderr)
        entry["weights_fit_config"] = misfit is None
        if weights_base_url:
            wname = f"{name}_v{version}_model.pt"
            with _atomic_path(out / wname) as tmp:
                shutil.copyfile(weights, tmp)
            digest = sha256_file(out / wname)
            url = weights_base_url.rstrip("/") + "/" + urllib.parse.quote(wname)
            extra[LARGE_FILES] = (json.dumps({"large_files": [
                {"path": "models/model.pt", "url": url, "hash_val": digest, "hash_type": "sha256"}]}, indent=4)
                + "\n").encode()
            entry.update({"weights": "large_files", "weights_file": wname, "weights_url": url,
                          "weights_sha256": digest, "weights_size": (out / wname).stat().st_size})
        else:
            entry.update({"weights": "included", "weights_sha256": sha256_file(weights)})
    members: Dict[str, Union[bytes, Path]] = {**{rel: text.encode() for rel, text in files.items()}, **extra}
    if weights is not None and not weights_base_url:
        members["models/model.pt"] = weights
    with _atomic_path(out / zname) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            for rel in sorted(members, key=member_rank):
                data = members[rel]
                if isinstance(data, Path):
                    _zip_file(zf, f"{name}/{rel}", data)
                else:
                    _zip_bytes(zf, f"{name}/{rel}", data)
    entry.update({"sha256": sha256_file(out / zname), "size": (out / zname).stat().st_size})
    return entry


def build(out: str = "dist", bundles: Optional[Union[str, Sequence[str]]] = None,
          weights: Optional[Union[str, Mapping[str, str], Sequence[str]]] = None,
          weights_base_url: Optional[str] = None, wheel: bool = True) -> None:
    """Build the wheel, the bundle archives and ``model_info.json`` into ``out``.

    Args:
        out: output folder (created; files of other versions in it are left alone).
        bundles: bundle names (comma-separated or a list); default all twelve.
        weights: ``NAME=PATH,...`` (or a dict): a trained ``models/model.pt`` per bundle.
        weights_base_url: publish the weights beside the archives and reference them from
            ``large_files.json`` at ``<weights_base_url>/<bundle>_v<version>_model.pt`` instead of
            including them (e.g. the release's download URL).
        wheel: also build the package's wheel.
    """
    from networks import bundle_gen

    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    names = bundle_gen.bundle_names() if not bundles else (
        [b.strip() for b in bundles.split(",")] if isinstance(bundles, str) else list(bundles))
    unknown = sorted(set(names) - set(bundle_gen.bundle_names()))
    if unknown:
        raise ValueError(f"unknown bundle(s) {unknown}; known: {', '.join(bundle_gen.bundle_names())}")
    wmap = parse_mapping(weights)
    unknown = sorted(set(wmap) - set(names))
    if unknown:
        raise ValueError(f"--weights for bundle(s) not being built: {unknown}")
    drift = bundle_gen.check()
    if drift:
        raise RuntimeError("bundles/ is out of date with networks/bundle_gen (run `make bundles`): " + ", ".join(drift))
    package = package_version()
    written: List[Path] = []
    if wheel:
        written.append(build_wheel(outp))
    index_path = outp / INDEX
    index: Dict[str, Any] = json.loads(index_path.read_text()) if index_path.is_file() else {}
    for name in names:
        d, v = name.split("_", 1)
        files = bundle_gen.render_bundle(d, v)
        entry = build_archive(name, files, outp, package=package, weights=wmap.get(name),
                              weights_base_url=weights_base_url)
        index[f"{name}_v{entry['version']}"] = entry
        written.append(outp / entry["file"])
        if entry.get("weights_file"):
            written.append(outp / entry["weights_file"])
        print(f"{entry['file']}: {entry['size']} bytes, sha256 {entry['sha256']}, weights: {entry['weights']}")
    _write_text_atomic(index_path, json.dumps(dict(sorted(index.items())), indent=4) + "\n")
    sums = outp / "SHA256SUMS"
    lines = {}
    if sums.is_file():
        for line in sums.read_text().splitlines():
            if "  " in line:
                h, f = line.split("  ", 1)
                lines[f] = h
    for p in written + [index_path]:
        lines[p.name] = sha256_file(p)
    _write_text_atomic(sums, "".join(f"{h}  {f}\n" for f, h in sorted(lines.items())))


# ------------------------------------------------------------------ verified download


def _download(url: str, dest: Path, timeout: float = 60.0) -> None:
    """``url`` to ``dest``; a short read (fewer bytes than Content-Length) raises."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f:
            expected = r.headers.get("Content-Length")
            shutil.copyfileobj(r, f, 1 << 20)
            got = f.tell()
    except (urllib.error.URLError, OSError) as e:
        raise ArchiveError(f"download of {url} failed: {e}") from None
    if expected is not None and got != int(expected):
        raise ArchiveError(f"download of {url} truncated: {got} of {expected} bytes")


def _check_zip(path: Path, name: str) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ArchiveError(f"{path.name}: member {bad} is corrupted (CRC mismatch)")
            for member in zf.namelist():
                parts = Path(member).parts
                if member.startswith("/") or ".." in parts or not parts or parts[0] != name:
                    raise ArchiveError(f"{path.name}: member {member!r} is not under the single top folder {name}/")
    except zipfile.BadZipFile as e:
        raise ArchiveError(f"{path.name}: not a valid zip archive ({e}); the file is corrupted or truncated") from None
    except (zlib.error, EOFError) as e:
        raise ArchiveError(f"{path.name}: corrupted archive ({e})") from None


def fetch(url: str, bundle_dir: str = ".", name: Optional[str] = None, index_url: Optional[str] = None,
          large_files: bool = True, overwrite: bool = False, timeout: float = 60.0) -> None:
    """Download and extract one bundle archive, verified, to ``<bundle_dir>/<bundle>``.

    Args:
        url: the archive's URL (``.../<bundle>_v<version>.zip``; ``file://`` works too).
        bundle_dir: where ``<bundle>/`` is created.
        name: the bundle name (default: from the file name).
        index_url: the ``model_info.json`` to check the archive's sha256 and size against (default: the one
            beside ``url``). A bundle missing from it, or a different sha256 or size, is an error.
        large_files: also fetch the weights listed in the archive's ``large_files.json`` (sha256-checked).
        overwrite: replace an existing ``<bundle_dir>/<bundle>`` (otherwise it is an error).
    """
    fname = urllib.parse.unquote(url.rstrip("/").rsplit("/", 1)[-1])
    m = re.match(r"^(?P<name>.+)_v(?P<version>\d+\.\d+\.\d+)\.zip$", fname)
    if not m:
        raise ArchiveError(f"{fname}: expected an archive named <bundle>_v<version>.zip")
    name = name or m.group("name")
    key = f"{m.group('name')}_v{m.group('version')}"
    index_url = index_url or url.rsplit("/", 1)[0] + "/" + INDEX
    root = Path(bundle_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.exists() and not overwrite:
        raise ArchiveError(f"{final} already exists (pass --overwrite True to replace it)")
    work = Path(tempfile.mkdtemp(prefix=f".{name}.fetch.", dir=root))
    try:
        _download(index_url, work / INDEX, timeout)
        try:
            entry = json.loads((work / INDEX).read_text())[key]
        except (ValueError, KeyError):
            raise ArchiveError(f"{index_url} has no entry {key}") from None
        archive = work / fname
        _download(url, archive, timeout)
        size, digest = archive.stat().st_size, sha256_file(archive)
        if size != entry["size"] or digest != entry["sha256"]:
            raise ArchiveError(f"{fname}: sha256 {digest} ({size} bytes) does not match {index_url} "
                               f"({entry['sha256']}, {entry['size']} bytes): the download is corrupted or truncated")
        _check_zip(archive, m.group("name"))
        extract = work / "x"
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(extract)
        bundle = extract / m.group("name")
        lf = bundle / LARGE_FILES
        if large_files and lf.is_file():
            from monai.bundle import download_large_files

            try:
                # (monai 1.6.1 finds large_files.* itself; its large_file_name argument is broken)
                download_large_files(bundle_path=str(bundle))
            except Exception as e:  # noqa: BLE001 - HashCheckError, URLError, ...
                raise ArchiveError(f"{name}: weights listed in {LARGE_FILES} could not be fetched: {e}") from None
        if final.exists():
            old = work / "old"
            os.replace(final, old)
        os.replace(bundle, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{final}: {key} (sha256 {digest})")


def main() -> None:
    """CLI: ``build`` / ``fetch``; a failure ends with its reason on one line (``error: ...``) and exit status 1,
    not with the traceback of the download or zip machinery."""
    import fire

    try:
        fire.Fire({"build": build, "fetch": fetch})
    except (ArchiveError, ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
