"""lcprobe data: pinned files, sha256 checks, resumable downloads (from a local HTTP server)."""

from __future__ import annotations

import hashlib
import http.server
import re
import shutil
import threading
from pathlib import Path

import pytest

from lcprobe.files import datafiles as data
from lcprobe.cli import main
from lcprobe.errors import LcprobeError
from paths import paper_data, require_paper_data

SHARED = paper_data()


def _blob(n: int) -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(n))


def _file(name: str, payload: bytes) -> data.DataFile:
    return data.DataFile(name, len(payload), hashlib.sha256(payload).hexdigest(), ("t",))


class _Server:
    """A local HTTP server for one directory that honours ``Range`` (or not) and logs requests."""

    def __init__(self, root: Path, ranges: bool = True, cut_after: int | None = None) -> None:
        self.requests: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = root / self.path.rsplit("/", 1)[-1]
                outer.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if not path.is_file():
                    self.send_error(404)
                    return
                body = path.read_bytes()
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m and ranges:
                    start = int(m.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    body = body[start:]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                # a server that drops the connection part-way through
                self.wfile.write(body if cut_after is None else body[:cut_after])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch):
    # the digest cache of these throw-away files stays out of the user's cache
    monkeypatch.setenv("LCPROBE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def served(tmp_path: Path):
    src = tmp_path / "server"
    src.mkdir()
    payloads = {"a.json": _blob(300_000), "b.tsv": _blob(70_001)[::-1]}
    for name, payload in payloads.items():
        (src / name).write_bytes(payload)
    files = tuple(_file(n, p) for n, p in payloads.items())
    return src, files, payloads


def test_pinned_digests_match_the_shared_copy():
    require_paper_data()
    states = data.status(SHARED)
    assert [s.file.name for s in states] == [f.name for f in data.FILES]
    assert all(s.state == "ok" for s in states), [(s.file.name, s.state) for s in states]
    assert re.fullmatch(r"[0-9a-f]{40}", data.COMMIT) and data.COMMIT in data.BASE_URL


def test_pull_into_a_complete_directory_writes_nothing(capsys):
    require_paper_data()
    before = {p.name: p.stat().st_mtime_ns for p in SHARED.iterdir()}
    # an unreachable URL proves no request is made
    out = data.pull(SHARED, base_url="http://127.0.0.1:9/none/")
    assert out.fetched == [] and len(out.present) == len(data.FILES)
    assert {p.name: p.stat().st_mtime_ns for p in SHARED.iterdir()} == before
    assert main(["data", "pull", "--dir", str(SHARED), "--base-url", "http://127.0.0.1:9/"]) == 0
    assert "8 file(s) already present and verified" in capsys.readouterr().out


def test_download_verifies_and_is_idempotent(tmp_path: Path, served):
    src, files, payloads = served
    dest = tmp_path / "dest"
    seen = []
    with _Server(src) as srv:
        out = data.pull(dest, base_url=srv.url, files=files, progress=lambda n, d, t: seen.append((n, d, t)))
        assert out.fetched == ["a.json", "b.tsv"]
        assert seen[-1] == ("b.tsv", len(payloads["b.tsv"]), len(payloads["b.tsv"]))
        n_requests = len(srv.requests)
        again = data.pull(dest, base_url=srv.url, files=files)
        assert again.fetched == [] and len(srv.requests) == n_requests
    for name, payload in payloads.items():
        assert (dest / name).read_bytes() == payload
    assert not list(dest.glob("*.part"))


def test_verified_files_are_not_hashed_again(tmp_path: Path, served, monkeypatch):
    from lcprobe.files import download

    src, files, payloads = served
    dest = tmp_path / "dest"
    with _Server(src) as srv:
        data.pull(dest, base_url=srv.url, files=files)
    assert sorted(p.name for p in dest.iterdir()) == ["a.json", "b.tsv"]  # the digests live in the cache

    def no_hashing(*args, **kwargs):
        raise AssertionError("hashed a file whose digest is cached")

    monkeypatch.setattr(download, "sha256_file", no_hashing)
    assert [data.file_state(f, dest).state for f in files] == ["ok", "ok"]
    (dest / "b.tsv").write_bytes(b"x" * len(payloads["b.tsv"]))  # a new version of the file is hashed
    with pytest.raises(AssertionError, match="hashed"):
        data.file_state(files[1], dest)


def test_resume_sends_a_range_request(tmp_path: Path, served):
    src, files, payloads = served
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a.json.part").write_bytes(payloads["a.json"][:123_456])
    with _Server(src) as srv:
        data.pull(dest, base_url=srv.url, files=files[:1])
        assert srv.requests == [{"path": "/data/a.json", "range": "bytes=123456-"}]
    assert (dest / "a.json").read_bytes() == payloads["a.json"]


def test_server_without_ranges_restarts_from_zero(tmp_path: Path, served):
    src, files, payloads = served
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a.json.part").write_bytes(payloads["a.json"][:1000])
    with _Server(src, ranges=False) as srv:
        data.pull(dest, base_url=srv.url, files=files[:1])
    assert (dest / "a.json").read_bytes() == payloads["a.json"]


def test_interrupted_download_keeps_the_part_and_resumes(tmp_path: Path, served):
    src, files, payloads = served
    dest = tmp_path / "dest"
    with _Server(src, cut_after=50_000) as srv:
        with pytest.raises(LcprobeError, match="run `lcprobe data pull` again to resume"):
            data.pull(dest, base_url=srv.url, files=files[:1], timeout=5)
    assert (dest / "a.json.part").stat().st_size == 50_000
    assert not (dest / "a.json").exists()
    with _Server(src) as srv:
        data.pull(dest, base_url=srv.url, files=files[:1])
        assert srv.requests[0]["range"] == "bytes=50000-"
    assert (dest / "a.json").read_bytes() == payloads["a.json"]


def test_wrong_bytes_are_refused_and_removed(tmp_path: Path, served):
    src, files, payloads = served
    (src / "a.json").write_bytes(payloads["a.json"][::-1])  # same size, other content
    dest = tmp_path / "dest"
    with _Server(src) as srv:
        with pytest.raises(LcprobeError, match="sha256 mismatch"):
            data.pull(dest, base_url=srv.url, files=files[:1])
    assert not (dest / "a.json").exists() and not (dest / "a.json.part").exists()


def test_a_corrupt_present_file_is_fetched_again(tmp_path: Path, served):
    src, files, payloads = served
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "b.tsv").write_bytes(b"x" * len(payloads["b.tsv"]))
    assert data.file_state(files[1], dest).state == "wrong sha256"
    with _Server(src) as srv:
        out = data.pull(dest, base_url=srv.url, files=files)
    assert out.fetched == ["a.json", "b.tsv"]
    assert (dest / "b.tsv").read_bytes() == payloads["b.tsv"]


def test_http_error_is_one_line(tmp_path: Path, served):
    src, files, _ = served
    with _Server(src) as srv:
        with pytest.raises(LcprobeError, match="HTTP 404"):
            data.pull(tmp_path / "d", base_url=srv.url, files=(data.DataFile("nope.json", 3, "0" * 64, ()),))


def test_cli_pull_list_and_path(tmp_path: Path, monkeypatch, capsys):
    require_paper_data()
    # a server holding the real files, so the real FILES table is exercised end to end
    src = tmp_path / "server"
    shutil.copytree(SHARED, src)
    dest = tmp_path / "cache"
    monkeypatch.setenv("LCPROBE_DATA", str(dest))
    assert main(["data", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(dest)
    assert main(["data", "list"]) == 0
    assert "8 file(s) not ready; run: lcprobe data pull" in capsys.readouterr().out
    with _Server(src) as srv:
        assert main(["data", "pull", "--base-url", srv.url]) == 0
    assert "fetched 8 file(s)" in capsys.readouterr().out
    assert all(s.state == "ok" for s in data.status(dest))
    # the tasks now find their data there
    from lcprobe.tasks.task import load_task

    assert Path(load_task("reclor").data).parent == dest.resolve()
