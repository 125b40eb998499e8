"""The command line as installed: it needs no Python sources (help texts are data, not parsed source)."""

from __future__ import annotations

import compileall
import shutil
import subprocess
import sys

from conftest import ROOT, base_env


def test_help_works_in_an_install_without_py_files(tmp_path):
    """Some installs ship only compiled .pyc files; `--help` parsed TrainConfig's source with `ast` and
    broke every command there."""
    package = shutil.copytree(ROOT / "ddp_mnist", tmp_path / "ddp_mnist", ignore=shutil.ignore_patterns("__pycache__"))
    assert compileall.compile_dir(str(package), legacy=True, quiet=1)  # module.pyc beside module.py
    for source in package.glob("*.py"):
        source.unlink()
    env = base_env(PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "ddp_mnist", "train", "--help"], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GLOBAL batch per optimizer step" in proc.stdout  # --batch-size's text, from the field's metadata
    found = subprocess.run([sys.executable, "-c", "import ddp_mnist.config as c; print(c.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path).stdout
    assert found.strip().endswith(".pyc")  # the copy without sources really was the one run
