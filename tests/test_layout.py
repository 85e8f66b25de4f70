"""The layers of docs/architecture.md, held on the code: which package may import which, where
Ray, the HTTP framework and torch may be imported, and that the core loads without them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "serve_app"
#: Modules of the package root every layer may import: the internal types, the domain errors,
#: the environment, the config tree.
BASE = {"serve_app", "serve_app.types", "serve_app.errors", "serve_app.env", "serve_app.config"}
#: Each layer and the layers it may import (besides BASE and itself).
LAYERS: dict[str, set[str]] = {
    "config": set(),
    "engine": set(),
    "runtime": {"engine"},
    "frontend": set(),
    "serve": {"engine", "runtime", "frontend"},
    "launch": set(),
    "tools": {"engine", "runtime", "frontend"},
    "testing": set(),
}
#: Third-party imports kept to some layers. The config checks Ray Serve's own deployment
#: options with Ray's schema, importing it only then (test_core_modules_load_... holds that).
CONFINED = {
    "ray": {"serve", "launch", "tools", "config.ray_options"},
    "fastapi": {"frontend.http", "serve"},
    "starlette": {"frontend.http", "serve"},
    "torch": {"engine"},
    "transformers": {"engine"},
    "onnxruntime": {"engine.backends", "engine.convert"},  # convert: fusions, int8
    "openvino": {"engine.backends", "engine.convert"},  # convert: the IR copy
    "onnx": {"engine.convert"},
}
ADAPTERS = ("openai", "kserve_v1", "v2", "rerank")


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (relative imports resolved)."""
    found: set[str] = set()
    here = ".".join(path.relative_to(REPO).with_suffix("").parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parent = here.rsplit(".", node.level)[0]
                module = f"{parent}.{module}" if module else parent
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def layer_of(module: str) -> str | None:
    """The layer (a sub-package of serve_app) ``module`` belongs to; None for the root's."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "proto" not in p.parts)


def test_every_layer_is_a_package_that_says_what_it_owns():
    for layer in LAYERS:
        init = PACKAGE / layer / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) > 20, f"serve_app/{layer}/__init__.py needs its paragraph"
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root == {"__init__", "__main__", "types", "errors", "env"}, root


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_the_layers_below_it(path):
    module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    own = layer_of(module)
    allowed = LAYERS.get(own, set()) | ({own} if own else set())
    if path.name == "__main__.py":
        allowed = {"launch"}  # python -m serve_app is the command line
    for imported in imports_of(path):
        if not imported.startswith("serve_app.") and imported != "serve_app":
            continue
        theirs = layer_of(imported)
        if theirs is None:
            assert imported in BASE or imported.rsplit(".", 1)[0] in BASE, (module, imported)
        else:
            assert theirs in allowed | {"config"}, \
                f"{module} imports {imported}: {own or 'the root'} may not import {theirs}"


@pytest.mark.parametrize("library", sorted(CONFINED))
def test_ray_http_and_torch_stay_in_their_layers(library):
    where = CONFINED[library]
    for path in modules():
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        uses = {m.split(".")[0] for m in imports_of(path)}
        if library in uses:
            assert any(module == w or module.startswith(w + ".") for w in where), \
                f"serve_app.{module} imports {library}; only {sorted(where)} may"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_no_protocol_adapter_imports_another(adapter):
    theirs = {m for m in imports_of(PACKAGE / "frontend" / "http" / f"{adapter}.py")
              if m.startswith("serve_app.frontend.http.")}
    others = {f"serve_app.frontend.http.{a}" for a in (*ADAPTERS, "app")}
    assert not {m for m in theirs if m.rsplit(".", 1)[0] in others or m in others}


@pytest.mark.parametrize("module", ["serve_app.engine.embedding", "serve_app.engine.reranker",
                                    "serve_app.runtime.runner", "serve_app.runtime.variants",
                                    "serve_app.frontend.dataplane", "serve_app.frontend.v2",
                                    "serve_app.config"])
def test_core_modules_load_without_ray_or_an_http_framework(module):
    code = (f"import sys, {module}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'fastapi', "
            "'starlette'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_frontend_loads_without_torch():
    code = ("import sys, serve_app.frontend.http.app, serve_app.frontend.v2; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "False", out.stdout
