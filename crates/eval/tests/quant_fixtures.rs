//! Quantization, integer and some float operators against the ONNX
//! reference implementation (float_* fixtures: within 1e-5 relative; the
//! others bit for bit). Each
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
    assert!(files.len() >= 29, "fixtures are in {}", dir.display());
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
        let float = path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("float_");
        for j in 0..k {
            if float {
                let (a, b) = (
                    out[j].to_f64_vec().unwrap(),
                    out[j + k].to_f64_vec().unwrap(),
                );
                assert_eq!(out[j].shape(), out[j + k].shape(), "{}", path.display());
                let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
                let diff = a
                    .iter()
                    .zip(&b)
                    .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    diff / scale <= 1e-5,
                    "{} output {j}: relative difference {:e}",
                    path.display(),
                    diff / scale
                );
                continue;
            }
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
