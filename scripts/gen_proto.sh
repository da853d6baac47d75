#!/usr/bin/env bash
# Regenerates kvrecall/v1/*_pb2*.py from proto/. The generated code is committed (see
# proto/README.md): it is produced by grpcio-tools 1.80.0 so that it runs on every grpcio
# >= 1.80 and protobuf >= 6.31 runtime we support, GPU images included.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${KVRECALL_PROTO_VENV:-/tmp/kvrecall-protoc-venv}
if [ ! -x "$tools/bin/python" ]; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q "grpcio-tools==1.80.0"
fi
"$tools/bin/python" -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
  proto/kvrecall/v1/kvrecall.proto
touch kvrecall/v1/__init__.py
echo "generated kvrecall/v1 from proto/kvrecall/v1/kvrecall.proto"
