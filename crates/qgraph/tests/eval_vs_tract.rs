//! Oracle: qgraph's evaluator against tract-onnx on every shared model, on
//! the same seeded random input at batch 1: outputs within 1e-4 relative
//! (max |a - b| / max |b|).

mod common;

use common::*;

#[test]
fn the_evaluator_matches_tract_on_every_shared_model() {
    let Some(models) = evaluable_shared_models() else {
        return;
    };
    for path in models {
        let loaded = qgraph::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let inputs = random_inputs(input_shapes(&loaded.model));
        let bytes = std::fs::read(&path).unwrap();
        let expected = run_tract(&bytes, &to_tract(&inputs))
            .unwrap_or_else(|e| panic!("{}: tract: {e:?}", path.display()));
        let ev = qgraph::eval::Evaluator::new(&loaded.model)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let ours = ev
            .run(
                inputs
                    .iter()
                    .map(|(s, d)| qgraph::ir::Tensor::f32(s, d.clone()).unwrap())
                    .collect(),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(ours.len(), expected.len());
        for (a, b) in ours.iter().zip(&expected) {
            let qgraph::ir::Tensor::F32(a) = a else {
                panic!("{}: output is not f32", path.display())
            };
            let b = b.to_plain_array_view::<f32>().unwrap();
            assert_eq!(a.shape(), b.shape(), "{}", path.display());
            let scale = b
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()))
                .max(f32::MIN_POSITIVE);
            let diff = a
                .iter()
                .zip(b.iter())
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            let rel = diff / scale;
            eprintln!(
                "{}: max abs diff {diff:.3e}, relative {rel:.3e}",
                path.file_name().unwrap().to_string_lossy()
            );
            assert!(
                rel <= 1e-4,
                "{}: relative difference {rel:e} > 1e-4",
                path.display()
            );
        }
    }
}
