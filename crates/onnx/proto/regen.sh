#!/usr/bin/env bash
# Regenerates src/generated/onnx.rs from proto/onnx.proto with protox and
# prost-build (pure Rust: no protoc needed). The test that runs here is the
# same one that checks, in every `cargo test`, that the file is up to date.
set -euo pipefail
cd "$(dirname "$0")/../../.."
QGRAPH_REGEN_PROTO=1 cargo test -p qgraph-onnx --test proto_codegen
echo "regenerated crates/onnx/src/generated/onnx.rs"
