"""The installed package as a user meets it: importable from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys


def test_imports_where_the_working_directory_holds_a_folder_named_fastpair(tmp_path):
    """Python started in the folder above a clone named fastpair sees the clone as a namespace package
    "fastpair" first; with the default editable install (an import hook behind sys.path) that shadowed the
    package: "cannot import name 'pairwise_nce' from 'fastpair' (unknown location)". `make venv` installs in
    strict editable mode (a tree of links on sys.path), where the regular package wins, as with a wheel."""
    (tmp_path / "fastpair").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", "from fastpair import pairwise_nce; import fastpair.kernels, "
                          "fastpair.training; print(pairwise_nce.__module__)"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "fastpair.loss"


def test_import_fastpair_does_not_import_torch():
    """`import fastpair` and its version are torch-free (the command lines parse their options first)."""
    run = subprocess.run([sys.executable, "-c", "import sys, fastpair; print(fastpair.__version__, "
                          "'torch' in sys.modules)"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[1] == "False"
