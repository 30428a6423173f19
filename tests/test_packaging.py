"""A wheel install, run from another directory, has the built-in tasks and the model catalog."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_lists_builtin_tasks(tmp_path):
    wheels = tmp_path / "wheels"
    # its own CMake build directory: the editable install's build/ stays untouched
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                            "-C", f"build-dir={tmp_path / 'build'}", str(REPO)],
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("lcprobe-*.whl")
    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-3000:]
    # -S keeps the editable install's path hook out: only the wheel's lcprobe is importable,
    # next to the environment's dependencies.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]),
           "LCPROBE_CACHE": str(tmp_path / "cache")}
    env.pop("LCPROBE_TASKS", None)
    env.pop("LCPROBE_MODELS", None)
    code = ("import sys, lcprobe; from lcprobe.cli import main; print(lcprobe.__file__, file=sys.stderr); "
            "sys.exit(main(sys.argv[1:]))")
    work = tmp_path / "elsewhere"
    work.mkdir()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-S", "-c", code, *args], capture_output=True, text=True,
                              cwd=work, env=env, timeout=300)

    tasks = cli("tasks", "--json")
    assert tasks.returncode == 0, tasks.stderr
    assert str(target) in tasks.stderr  # the wheel's copy ran, not the checkout
    names = {t["name"] for t in json.loads(tasks.stdout)}
    assert {"calc", "capitals", "lama", "mps-cal", "reclor", "truthfulqa-mc"} <= names
    models = cli("models", "path", "smollm2-135m")
    assert models.returncode == 0, models.stderr
    # pulled models go to the user's cache, never into site-packages
    assert Path(models.stdout.strip()).parent == tmp_path / "cache" / "models"
    # a built-in task's data ships in the wheel: capitals loads and renders its items
    probe = subprocess.run([sys.executable, "-S", "-c",
                            "from lcprobe.tasks.task import load_task; t = load_task('capitals'); "
                            "print(len(t.items()))"], capture_output=True, text=True, cwd=work, env=env, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert int(probe.stdout) == 125  # 128 rows, 3 of them the demonstrations
