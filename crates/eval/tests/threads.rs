//! Results do not depend on the number of threads: every shared model, at
//! batch 3, gives bit-identical outputs with 1, 2 and 3 worker threads.

use qgraph_eval::{Evaluator, Options};
use std::path::PathBuf;

#[test]
fn outputs_are_identical_whatever_the_thread_count() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!(
            "SKIPPED: {} is absent (it exists beside the project in CI)",
            dir.display()
        );
        return;
    };
    let mut models: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    models.sort();
    for path in models {
        let model = qgraph_onnx::read_model(&path).unwrap().model;
        let inputs = Evaluator::new(&model).unwrap().example_inputs(3).unwrap();
        let run = |threads| {
            Evaluator::with_options(&model, Options { threads })
                .unwrap()
                .run(inputs.clone())
                .unwrap()
        };
        let one = run(1);
        for threads in [2, 3] {
            assert!(
                run(threads) == one,
                "{}: {threads} threads differ from 1",
                path.display()
            );
        }
    }
}
