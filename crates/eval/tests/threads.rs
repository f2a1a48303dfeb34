//! Results depend neither on the number of threads nor on the plan's
//! fusion: every shared model, at batch 3, gives bit-identical outputs with
//! 1, 2 and 3 worker threads, and when every value is watched (which runs
//! each node on its own).

use qgraph_eval::{Evaluator, Options};
use std::path::PathBuf;

fn shared_models() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!(
            "SKIPPED: {} is absent (it exists beside the project in CI)",
            dir.display()
        );
        return Vec::new();
    };
    let mut models: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    models.sort();
    // Models with operators the evaluator does not run yet say so and are
    // left out; the others must all pass.
    models.retain(|path| {
        let model = qgraph_onnx::read_model(path).unwrap().model;
        match Evaluator::new(&model) {
            Err(e @ qgraph_eval::EvalError::Unsupported { .. }) => {
                eprintln!("SKIPPED {}: {e}", path.display());
                false
            }
            // The synthetic inputs are float32 (token ids and flags are
            // checked on real data by tools/data_check.py).
            Ok(ev) => match ev.example_inputs(1) {
                Err(e) => {
                    eprintln!("SKIPPED {}: {e}", path.display());
                    false
                }
                Ok(_) => true,
            },
            Err(_) => true,
        }
    });
    models
}

#[test]
fn fused_kernels_give_the_same_bits_as_node_by_node_evaluation() {
    for path in shared_models() {
        let model = qgraph_onnx::read_model(&path).unwrap().model;
        // Whole batches: the observed run takes them too (observers see
        // values in batch order), and the products must be the same ones.
        let options = Options {
            whole_batches: true,
            ..Default::default()
        };
        let ev = Evaluator::with_options(&model, options).unwrap();
        let inputs = ev.example_inputs(3).unwrap();
        let fused = ev.run(inputs.clone()).unwrap();
        let every = model.graph.value_ids();
        let mut seen = 0usize;
        let alone = ev
            .run_observed(inputs, &every, &mut |_, _| seen += 1)
            .unwrap();
        assert!(seen > 0);
        assert!(fused == alone, "{}: fusion changed a value", path.display());
    }
}

/// Every shared model at `batch` gives the same bits on 1, 2 and 3 threads.
fn same_bits_on_one_two_and_three_threads(batch: usize) {
    for path in shared_models() {
        let model = qgraph_onnx::read_model(&path).unwrap().model;
        let inputs = Evaluator::new(&model)
            .unwrap()
            .example_inputs(batch)
            .unwrap();
        let run = |threads| {
            Evaluator::with_options(
                &model,
                Options {
                    threads,
                    ..Default::default()
                },
            )
            .unwrap()
            .run(inputs.clone())
            .unwrap()
        };
        let one = run(1);
        for threads in [2, 3] {
            assert!(
                run(threads) == one,
                "{}: batch {batch} differs on {threads} threads",
                path.display()
            );
        }
    }
}

#[test]
fn outputs_are_identical_whatever_the_thread_count() {
    same_bits_on_one_two_and_three_threads(3);
}

/// At batch 1 a convolution's tasks are blocks of output channels cut from
/// its shape, shared out over however many threads there are, and a fully
/// connected layer's columns are cut into one block per thread: the bits
/// are the same on one, two and three.
#[test]
fn single_images_give_the_same_bits_whatever_the_thread_count() {
    same_bits_on_one_two_and_three_threads(1);
}

/// An empty batch gives empty outputs, not a panic (nor, with the workers
/// kept awake, a hang); two threads so that the helpers spin.
#[test]
fn an_empty_batch_runs_to_empty_outputs() {
    let model = qgraph_text::parse_model(
        r#"ir_version 8
opset "" 13

graph main {
  input %x: f32[N,4]
  output %y: f32[N,3]
  init %w = f32[3,4] [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
  init %b = f32[3] [0.5, -0.5, 1]
  fc: %y = Gemm(%x, %w, %b) {transB = 1}
}
"#,
    )
    .unwrap();
    let options = Options {
        threads: 2,
        ..Default::default()
    };
    let ev = Evaluator::with_options(&model, options).unwrap();
    let x = qgraph_ir::Tensor::f32(&[0, 4], Vec::new()).unwrap();
    let out = ev.run(vec![x]).unwrap();
    assert_eq!(out[0].shape(), &[0, 3]);
}
