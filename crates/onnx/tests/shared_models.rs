//! Every model in ../shared/models reads, verifies, writes and reads back
//! to the same IR, and two writes are byte-identical.

use std::path::PathBuf;

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

#[test]
fn shared_models_round_trip_through_the_ir() {
    let Some(models) = shared_models() else {
        return;
    };
    assert!(!models.is_empty());
    for path in models {
        let loaded =
            qgraph_onnx::read_model(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let bytes = qgraph_onnx::encode_model(&loaded.model).unwrap();
        let again = qgraph_onnx::encode_model(&loaded.model).unwrap();
        assert_eq!(bytes, again, "{}: two encodings differ", path.display());
        let back = qgraph_onnx::decode_model(&bytes).unwrap();
        assert!(
            back.model == loaded.model,
            "{}: the written model reads back differently",
            path.display()
        );
        assert!(back.warnings.is_empty(), "{:?}", back.warnings);
        let rewritten = qgraph_onnx::encode_model(&back.model).unwrap();
        assert_eq!(
            bytes,
            rewritten,
            "{}: write(read(write(m))) != write(m)",
            path.display()
        );
    }
}
