//! Robustness of the passes: the full pipeline runs on every model under
//! `testdata/` (quantized-operator fixtures, text fixtures, the bundled
//! model) without a panic, leaves a model that verifies, and, where the
//! evaluator can make inputs for it (f32 inputs), computes the same outputs
//! within 1e-5 relative.

use std::path::{Path, PathBuf};

const PIPELINE: &str =
    "infer-shapes,fold-constants,fold-bn,fold-pad,fuse-matmul-add,fuse-conv-bn-act,cleanup";

fn models(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "malformed") {
                continue;
            }
            models(&p, out);
        } else if p.extension().is_some_and(|e| e == "onnx" || e == "qgt") {
            out.push(p);
        }
    }
}

#[test]
fn the_pipeline_keeps_every_testdata_model_valid_and_equal() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata");
    let mut paths = Vec::new();
    models(&root, &mut paths);
    paths.sort();
    assert!(paths.len() > 40, "fixtures are missing");
    let mut compared = 0;
    for path in paths {
        let Ok(loaded) = qgraph::load(&path) else {
            continue;
        };
        let original = loaded.model;
        let mut model = original.clone();
        qgraph::run_passes(&mut model, PIPELINE)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        qgraph::ir::verify_model(&model).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let Ok(before) = qgraph::eval::Evaluator::new(&original) else {
            continue;
        };
        let Ok(inputs) = before.example_inputs(2) else {
            continue;
        };
        let Ok(want) = before.run(inputs.clone()) else {
            continue;
        };
        let got = qgraph::eval::Evaluator::new(&model)
            .and_then(|e| e.run(inputs))
            .unwrap_or_else(|e| panic!("{}: after the passes: {e}", path.display()));
        for (a, b) in got.iter().zip(&want) {
            let (Some(x), Some(y)) = (a.to_f64_vec(), b.to_f64_vec()) else {
                assert_eq!(a, b, "{}", path.display());
                continue;
            };
            let scale = y
                .iter()
                .fold(0f64, |m, v| m.max(v.abs()))
                .max(f64::MIN_POSITIVE);
            let diff = x
                .iter()
                .zip(&y)
                .fold(0f64, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                diff / scale <= 1e-5,
                "{}: differs by {:e}",
                path.display(),
                diff / scale
            );
        }
        compared += 1;
    }
    assert!(compared >= 10, "only {compared} models compared");
}
