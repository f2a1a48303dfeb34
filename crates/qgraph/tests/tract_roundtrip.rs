//! Oracle: `tract-onnx`, an independent ONNX runtime, runs each shared model
//! as shipped and as qgraph wrote it (read, verify, write); the outputs must
//! be identical (max abs diff 0). Inputs are seeded random data at batch 1.

mod common;

use common::*;

#[test]
fn tract_gives_identical_outputs_before_and_after_a_qgraph_round_trip() {
    let Some(models) = shared_models() else {
        return;
    };
    let mut compared = 0;
    for path in &models {
        let original = std::fs::read(path).unwrap();
        let loaded = qgraph::load(path).unwrap_or_else(|e| panic!("{e}"));
        let written = qgraph::onnx::encode_model(&loaded.model).unwrap();
        let inputs = to_tract(&random_inputs(input_shapes(&loaded.model)));
        // The oracle must run the model as shipped for the comparison to
        // mean anything: a model tract cannot run is named and skipped.
        let a = match run_tract(&original, &inputs) {
            Ok(a) => a,
            Err(e) => {
                eprintln!(
                    "SKIPPED {}: tract cannot run it as shipped: {}",
                    path.display(),
                    format!("{e}").lines().next().unwrap_or_default()
                );
                continue;
            }
        };
        let b = run_tract(&written, &inputs)
            .unwrap_or_else(|e| panic!("{}: tract on qgraph's output: {e:?}", path.display()));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            let (x, y) = (
                x.to_plain_array_view::<f32>().unwrap(),
                y.to_plain_array_view::<f32>().unwrap(),
            );
            assert_eq!(x.shape(), y.shape());
            let max = x
                .iter()
                .zip(y.iter())
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert_eq!(max, 0.0, "{}: max abs diff {max}", path.display());
        }
        eprintln!(
            "{}: tract outputs identical (max abs diff 0)",
            path.file_name().unwrap().to_string_lossy()
        );
        compared += 1;
    }
    assert!(
        compared * 2 > models.len(),
        "tract ran only {compared} of {} models",
        models.len()
    );
}
