//! Oracle: `tract-onnx`, an independent ONNX runtime, runs each shared model
//! as shipped and as qgraph wrote it (read, verify, write); the outputs must
//! be identical (max abs diff 0). Inputs are seeded random data at batch 1.

use qgraph::ir::{Dim, ValueType};
use std::io::Cursor;
use std::path::PathBuf;
use tract_onnx::prelude::*;

fn shared_models() -> Option<Vec<PathBuf>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!(
            "SKIPPED: {} is absent (it exists beside the project in CI)",
            dir.display()
        );
        return None;
    };
    let mut models: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    models.sort();
    Some(models)
}

/// Concrete input shapes: batch 1, other unknown dims 64.
fn input_shapes(model: &qgraph::ir::Model) -> Vec<Vec<usize>> {
    let g = &model.graph;
    g.inputs()
        .iter()
        .filter(|&&v| g.value(v).initializer().is_none())
        .map(|&v| match &g.value(v).ty {
            Some(ValueType::Tensor(t)) => t
                .shape
                .as_ref()
                .expect("shared models declare input ranks")
                .iter()
                .enumerate()
                .map(|(i, d)| match d {
                    Dim::Known(k) if *k > 0 => *k as usize,
                    _ if i == 0 => 1,
                    _ => 64,
                })
                .collect(),
            other => panic!("unexpected input type {other:?}"),
        })
        .collect()
}

/// Runs a model in tract. With `concrete`, the input facts are set to the
/// inputs' shapes (for models whose declared inputs tract cannot analyse,
/// such as PaddlePaddle's -1 and "?" dims); without, the model's own
/// (possibly symbolic) declarations stand.
fn run_tract_with(bytes: &[u8], inputs: &[Tensor], concrete: bool) -> TractResult<Vec<Tensor>> {
    let mut model = tract_onnx::onnx().model_for_read(&mut Cursor::new(bytes))?;
    if concrete {
        for (i, t) in inputs.iter().enumerate() {
            model = model.with_input_fact(i, f32::fact(t.shape()).into())?;
        }
    }
    let plan = model.into_optimized()?.into_runnable()?;
    let outputs = plan.run(inputs.iter().cloned().map(|t| t.into()).collect())?;
    Ok(outputs.into_iter().map(|t| t.into_tensor()).collect())
}

fn run_tract(bytes: &[u8], inputs: &[Tensor]) -> TractResult<Vec<Tensor>> {
    run_tract_with(bytes, inputs, false).or_else(|_| run_tract_with(bytes, inputs, true))
}

#[test]
fn tract_gives_identical_outputs_before_and_after_a_qgraph_round_trip() {
    let Some(models) = shared_models() else {
        return;
    };
    for path in models {
        let original = std::fs::read(&path).unwrap();
        let loaded = qgraph::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let written = qgraph::onnx::encode_model(&loaded.model).unwrap();
        let mut seed = 0x9e3779b97f4a7c15u64;
        let inputs: Vec<Tensor> = input_shapes(&loaded.model)
            .into_iter()
            .map(|shape| {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = (0..n)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
                    })
                    .collect();
                tract_ndarray::ArrayD::from_shape_vec(shape, data)
                    .unwrap()
                    .into_tensor()
            })
            .collect();
        let a = run_tract(&original, &inputs)
            .unwrap_or_else(|e| panic!("{}: tract on the original: {e:?}", path.display()));
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
    }
}
