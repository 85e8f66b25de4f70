"""The layering docs/architecture.md describes, checked on the code: which modules may import
Ray or an HTTP framework, and which protocol module may import which."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "serve_app"
ADAPTERS = ("openai", "kserve_v1", "v2", "v2_grpc")
SHARED = {"serve_app.protocols.common", "serve_app.protocols.v2_codec"}


def imports_of(path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_no_protocol_adapter_imports_another(adapter):
    theirs = {m for m in imports_of(PACKAGE / "protocols" / f"{adapter}.py")
              if m.startswith("serve_app.protocols")}
    assert theirs <= SHARED, theirs - SHARED


@pytest.mark.parametrize("module", ["serve_app.protocols.v2_grpc", "serve_app.dataplane",
                                    "serve_app.replica", "serve_app.scheduler",
                                    "serve_app.engine", "serve_app.family",
                                    "serve_app.variants"])
def test_core_modules_load_without_ray_or_an_http_framework(module):
    code = (f"import sys, {module}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'fastapi', "
            "'starlette'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long
