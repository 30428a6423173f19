"""Build llama.cpp's own command-line tools from the exact source llama-cpp-python ships.

The tests compare lcprobe against ``llama-perplexity``; that comparison only
means something if the tool was compiled from the same llama.cpp commit as the
library lcprobe loads, so the source is the ``vendor/llama.cpp`` folder of the
installed llama-cpp-python version's sdist, fetched with pip. Builds are cached
outside the checkout, like pip's wheel cache: ``$LCPROBE_CACHE/llama-tools/<version>/``
(default ``~/.cache/lcprobe``). The first build takes a few minutes on 2 cores.

    python tests/llama_tools.py llama-perplexity     # build (or find) it, print its path
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path


def _cache_root() -> Path:
    return Path(os.environ.get("LCPROBE_CACHE") or Path.home() / ".cache" / "lcprobe").expanduser()


def llama_cpp_version() -> str:
    return metadata.version("llama_cpp_python")


def tools_dir(version: str | None = None) -> Path:
    return _cache_root() / "llama-tools" / (version or llama_cpp_version())


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        done = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[0]} failed (exit {done.returncode}); log {log}:\n{tail}")


def _source(root: Path, version: str, log: Path) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, unpacked under root/src."""
    src = root / "src" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "llama-cpp-python",
              f"llama-cpp-python=={version}", "-d", tmp], log)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            top = tar.getnames()[0].split("/")[0]
            members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/vendor/llama.cpp/")]
            tar.extractall(tmp, members=members, filter="data")
        if (root / "src").exists():
            shutil.rmtree(root / "src")
        shutil.move(str(Path(tmp) / top), root / "src")
    return src


def build_tool(target: str = "llama-perplexity", jobs: int = 2) -> Path:
    """Path of llama.cpp's ``target`` binary for the installed llama-cpp-python, built when missing."""
    version = llama_cpp_version()
    root = tools_dir(version)
    exe = root / "bin" / target
    if exe.is_file():
        return exe
    root.mkdir(parents=True, exist_ok=True)
    # Two test processes (or a test and a person) must not build into the same folder at once.
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if exe.is_file():
            return exe
        log = root / "build.log"
        src = _source(root, version, log)
        build = root / "build"
        _run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
              "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"], log)
        _run(["cmake", "--build", str(build), "--config", "Release", "--target", target, "-j", str(jobs)], log)
        built = next((p for p in (build / "bin" / target, build / target) if p.is_file()), None)
        if built is None:
            raise RuntimeError(f"{target} not found under {build} after the build; log {log}")
        (root / "bin").mkdir(exist_ok=True)
        tmp_exe = exe.with_suffix(".tmp")
        shutil.copy2(built, tmp_exe)
        os.replace(tmp_exe, exe)
    return exe


if __name__ == "__main__":
    print(build_tool(*(sys.argv[1:2] or ["llama-perplexity"])))
