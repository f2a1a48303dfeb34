//! Oracle for the passes: every registered pass alone, and the standard
//! pipeline, on every shared model keep the outputs within 1e-4 relative
//! (max |a - b| / max |b|) on the same seeded input, by qgraph's evaluator,
//! and by tract on the rewritten file where tract runs the original. Node
//! counts before and after are printed.

mod common;

use common::*;

const PIPELINES: &[&str] = &[
    "fold-constants",
    "remove-noops",
    "dce",
    "fold-bn",
    "fold-pad",
    "fuse-conv-bn-act",
    "fuse-matmul-add",
    "infer-shapes",
    "fold-constants,fold-bn,fold-pad,fuse-conv-bn-act,cleanup",
    "infer-shapes,fold-constants,fold-bn,fold-pad,fuse-matmul-add,fuse-conv-bn-act,cleanup",
];

fn relative_difference(a: &qgraph::ir::Tensor, b: &qgraph::ir::Tensor) -> f32 {
    let (qgraph::ir::Tensor::F32(a), qgraph::ir::Tensor::F32(b)) = (a, b) else {
        panic!("outputs are not f32");
    };
    assert_eq!(a.shape(), b.shape());
    let scale = b
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

#[test]
fn every_pass_keeps_every_shared_model_s_outputs() {
    let Some(models) = evaluable_shared_models() else {
        return;
    };
    for path in models {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let original = qgraph::load(&path).unwrap().model;
        let inputs: Vec<qgraph::ir::Tensor> = random_inputs(input_shapes(&original))
            .iter()
            .map(|(s, d)| qgraph::ir::Tensor::f32(s, d.clone()).unwrap())
            .collect();
        let expected = qgraph::eval::Evaluator::new(&original)
            .unwrap()
            .run(inputs.clone())
            .unwrap();
        let tract_inputs = to_tract(&random_inputs(input_shapes(&original)));
        let tract_runs = run_tract(&std::fs::read(&path).unwrap(), &tract_inputs).is_ok();
        for pipeline in PIPELINES {
            let mut model = original.clone();
            let report = qgraph::run_passes(&mut model, pipeline)
                .unwrap_or_else(|e| panic!("{name}: {pipeline}: {e}"));
            let got = qgraph::eval::Evaluator::new(&model)
                .unwrap_or_else(|e| panic!("{name}: {pipeline}: {e}"))
                .run(inputs.clone())
                .unwrap_or_else(|e| panic!("{name}: {pipeline}: {e}"));
            let worst = got
                .iter()
                .zip(&expected)
                .map(|(a, b)| relative_difference(a, b))
                .fold(0f32, f32::max);
            eprintln!(
                "{name}: {pipeline}: {} -> {} nodes, {} rewrites, relative difference {worst:.2e}",
                original.graph.node_count(),
                model.graph.node_count(),
                report.rewrites
            );
            assert!(
                worst <= 1e-4,
                "{name}: {pipeline}: relative difference {worst:e}"
            );
            if tract_runs {
                let bytes = qgraph::onnx::encode_model(&model).unwrap();
                let theirs = run_tract(&bytes, &tract_inputs)
                    .unwrap_or_else(|e| panic!("{name}: {pipeline}: tract: {e:?}"));
                for (a, b) in got.iter().zip(&theirs) {
                    let b = qgraph::ir::Tensor::f32(
                        b.shape(),
                        b.to_plain_array_view::<f32>()
                            .unwrap()
                            .iter()
                            .copied()
                            .collect(),
                    )
                    .unwrap();
                    let rel = relative_difference(a, &b);
                    assert!(rel <= 1e-4, "{name}: {pipeline}: tract differs by {rel:e}");
                }
            }
        }
    }
}
