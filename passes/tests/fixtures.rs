//! Filetests: each `testdata/passes/<pipeline>/<case>.qgt` is a model in the
//! text form; the directory names the pipeline run on it. The result's text
//! form is an insta snapshot (`passes/tests/snapshots/`), so a reviewer sees
//! what a pass does to each case, guard cases included (their snapshot shows
//! what must stay). Each case is also run through the evaluator before and
//! after on the same synthetic input: outputs within 1e-5 relative.

use qgraph_eval::Evaluator;
use qgraph_ir::Tensor;
use std::path::PathBuf;

fn max_relative(a: &Tensor, b: &Tensor) -> f64 {
    let (Some(x), Some(y)) = (a.to_f64_vec(), b.to_f64_vec()) else {
        return if a == b { 0.0 } else { f64::INFINITY };
    };
    assert_eq!(a.shape(), b.shape());
    let scale = y
        .iter()
        .fold(0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    x.iter()
        .zip(&y)
        .fold(0f64, |m, (p, q)| m.max((p - q).abs()))
        / scale
}

#[test]
fn pass_fixtures_match_their_snapshots_and_keep_outputs() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/passes");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "qgt"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "fixtures are missing");
    for path in cases {
        let pipeline = path
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let case = path.file_stem().unwrap().to_string_lossy().to_string();
        let source = std::fs::read_to_string(&path).unwrap();
        let original =
            qgraph_text::parse_model(&source).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut model = original.clone();
        qgraph_passes::Driver::from_pipeline(&pipeline)
            .unwrap()
            .run(&mut model)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let text = qgraph_text::print_model(&model, &qgraph_text::PrintOptions::with_all_data());
        insta::assert_snapshot!(format!("{pipeline}__{case}"), text);

        let before = Evaluator::new(&original).unwrap();
        let inputs = before.example_inputs(2).unwrap();
        let want = before.run(inputs.clone()).unwrap();
        let got = Evaluator::new(&model)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .run(inputs)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for (a, b) in got.iter().zip(&want) {
            let rel = max_relative(a, b);
            assert!(
                rel <= 1e-5,
                "{}: outputs differ by {rel:e} relative",
                path.display()
            );
        }
    }
}
