//! Helpers shared by the tests that use tract as an oracle.
#![allow(dead_code)]

use qgraph::ir::{Dim, ValueType};
use std::io::Cursor;
use std::path::PathBuf;
use tract_onnx::prelude::*;

pub fn shared_models() -> Option<Vec<PathBuf>> {
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

/// The shared models whose every operator the evaluator runs; the others
/// are named, with the operator, as skipped. `None` when the folder is
/// absent.
pub fn evaluable_shared_models() -> Option<Vec<PathBuf>> {
    let mut models = shared_models()?;
    models.retain(|path| {
        let model = qgraph::load(path).unwrap_or_else(|e| panic!("{e}")).model;
        // These tests feed seeded random float32 inputs; models with token
        // ids or flags as inputs (MiniLM, Silero) are checked on their real
        // inputs by tools/data_check.py in .ci/run.
        let g = &model.graph;
        let all_f32 = g
            .inputs()
            .iter()
            .filter(|&&v| g.value(v).initializer().is_none())
            .all(|&v| {
                matches!(&g.value(v).ty, Some(ValueType::Tensor(t))
                    if t.dtype == Some(qgraph::ir::DataType::F32))
            });
        if !all_f32 {
            eprintln!("SKIPPED {}: not every input is float32", path.display());
            return false;
        }
        match qgraph::eval::Evaluator::new(&model) {
            Err(e @ qgraph::eval::EvalError::Unsupported { .. }) => {
                eprintln!("SKIPPED {}: {e}", path.display());
                false
            }
            _ => true,
        }
    });
    Some(models)
}

/// Concrete input shapes: batch 1, other unknown dims 64.
pub fn input_shapes(model: &qgraph::ir::Model) -> Vec<Vec<usize>> {
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

pub fn run_tract(bytes: &[u8], inputs: &[Tensor]) -> TractResult<Vec<Tensor>> {
    run_tract_with(bytes, inputs, false).or_else(|_| run_tract_with(bytes, inputs, true))
}

/// Seeded pseudo-random inputs in [-1, 1) of the given shapes.
pub fn random_inputs(shapes: Vec<Vec<usize>>) -> Vec<(Vec<usize>, Vec<f32>)> {
    let mut seed = 0x9e3779b97f4a7c15u64;
    shapes
        .into_iter()
        .map(|shape| {
            let n: usize = shape.iter().product();
            let data = (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
                })
                .collect();
            (shape, data)
        })
        .collect()
}

pub fn to_tract(inputs: &[(Vec<usize>, Vec<f32>)]) -> Vec<Tensor> {
    inputs
        .iter()
        .map(|(s, d)| {
            tract_ndarray::ArrayD::from_shape_vec(s.clone(), d.clone())
                .unwrap()
                .into_tensor()
        })
        .collect()
}
