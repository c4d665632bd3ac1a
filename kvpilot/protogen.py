"""Regenerate the protobuf/gRPC stubs: `python -m kvpilot.protogen` (or `make proto`).

proto/kvpilot_protocol/v1/*.proto (package kvpilot.v1) compile into kvpilot_protocol/v1/*_pb2.py, *_pb2.pyi and
*_pb2_grpc.py, importable as `from kvpilot_protocol.v1 import decoder_pb2` (the neutral protocol package both
services import). The stubs are committed so that an install needs no
compiler; tests/test_proto.py regenerates them into a temporary folder and fails if they are stale.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT  # kvpilot_protocol/v1/... lands inside the protocol package


def proto_files() -> list[Path]:
    return sorted((PROTO_DIR / "kvpilot_protocol" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *[str(p) for p in proto_files()]]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_dir / "kvpilot_protocol" / "v1").glob("*_pb2*.py*"))


def stale_files() -> list[str]:
    """Names of committed stubs that differ from a fresh generation (empty when up to date)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for f in fresh:
            committed = OUT_DIR / "kvpilot_protocol" / "v1" / f.name
            if not committed.is_file() or committed.read_bytes() != f.read_bytes():
                stale.append(f.name)
        return stale


def main() -> int:
    written = generate(OUT_DIR)
    init = OUT_DIR / "kvpilot_protocol" / "v1" / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated protobuf/gRPC stubs (python -m kvpilot.protogen). Do not edit."""\n')
    for f in written:
        print(f.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
