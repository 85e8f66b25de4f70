#!/usr/bin/env python
"""Generate serve_app/frontend/v2/proto/inference_pb2*.py from inference.proto with grpcio-tools.

Usage: python scripts/gen_proto.py [OUT_DIR]   (default: the repository root, in place)
tests/test_grpc.py regenerates into a temporary directory and checks nothing changes.

The message module registers its types in a descriptor pool of its own, not protobuf's default
pool: tritonclient.grpc (and KServe) register the same ``inference.*`` names there, and a process
importing both would fail with "duplicate symbol". Type names never reach the wire; the service
path ``/inference.GRPCInferenceService/...`` stays the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = "serve_app/frontend/v2/proto/inference.proto"


def generate(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    stem = out_dir / "serve_app" / "frontend" / "v2" / "proto"
    messages = stem / "inference_pb2.py"
    code = messages.read_text()
    default_pool = "_descriptor_pool.Default().AddSerializedFile("
    if code.count(default_pool) != 1:
        raise SystemExit(f"unexpected generated code in {messages}: cannot use a private pool")
    messages.write_text(code.replace(default_pool, "_descriptor_pool.DescriptorPool()"
                                                   ".AddSerializedFile("))
    return [messages, stem / "inference_pb2.pyi", stem / "inference_pb2_grpc.py"]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(path)
