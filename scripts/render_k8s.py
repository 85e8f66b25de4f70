#!/usr/bin/env python
"""Put configs/k8s-*.yaml into the RayService manifests' serveConfigV2, verbatim.

Usage: python scripts/render_k8s.py   (rewrites k8s/rayservice-*.yaml in place)
The manifests keep the Serve config as a literal block; tests/test_k8s.py checks that each one
equals its file in configs/, so configs/ stays the one source of truth.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAIRS = {"k8s/rayservice-cpu.yaml": "configs/k8s-cpu.yaml",
         "k8s/rayservice-gpu.yaml": "configs/k8s-gpu.yaml"}
_BLOCK = re.compile(r"(  serveConfigV2: \|\n)(?:    .*\n|\n)+?(?=  \S)")


def render(manifest: str, config: str) -> str:
    body = "".join(f"    {line}\n" if line else "\n" for line in config.splitlines())
    out, n = _BLOCK.subn(lambda m: m.group(1) + body, manifest)
    if n != 1:
        raise SystemExit("expected exactly one serveConfigV2 block")
    return out


if __name__ == "__main__":
    for manifest, config in PAIRS.items():
        path = ROOT / manifest
        path.write_text(render(path.read_text(), (ROOT / config).read_text()))
        print(path)
