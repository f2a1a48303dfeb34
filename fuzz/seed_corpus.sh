#!/usr/bin/env bash
# Seeds the fuzz corpora from the project's own files: the bundled model, the
# malformed corpus, and text forms printed by qgraph.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p fuzz/corpus/onnx_reader fuzz/corpus/text_parser
cp testdata/models/*.onnx testdata/malformed/*.onnx fuzz/corpus/onnx_reader/
cp testdata/malformed/*.qgt fuzz/corpus/text_parser/
cargo run -q --release --bin qgraph -- show testdata/models/lenet5_mnist_clntrained.onnx -o fuzz/corpus/text_parser/lenet.qgt
find testdata -name '*.qgt' -exec cp {} fuzz/corpus/text_parser/ \;
echo "seeded fuzz/corpus"
