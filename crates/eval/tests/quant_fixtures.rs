//! Quantization and integer operators against the ONNX reference
//! implementation. Each
//! model in testdata/eval/ (made by tools/make_eval_fixtures.py) embeds its
//! input and, as output 1, the result of onnx's ReferenceEvaluator; the
//! evaluator's output 0 must equal it bit for bit.

use std::path::PathBuf;

#[test]
fn quantization_operators_match_the_onnx_reference_bit_for_bit() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/eval");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    files.sort();
    assert!(files.len() >= 22, "fixtures are in {}", dir.display());
    for path in files {
        let loaded =
            qgraph_onnx::read_model(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let ev = qgraph_eval::Evaluator::new(&loaded.model)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let out = ev
            .run(vec![])
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Outputs: the operator's k results, then the reference's k results.
        let k = out.len() / 2;
        assert!(k > 0 && out.len() == 2 * k);
        for j in 0..k {
            assert!(
                out[j] == out[j + k],
                "{} output {j}: ours {:?}\nreference {:?}",
                path.display(),
                out[j].to_f64_vec(),
                out[j + k].to_f64_vec()
            );
        }
    }
}
