//! Replays every saved fuzz input (fuzz/regressions/<target>/) through the
//! same checks the fuzz targets make (fuzz/fuzz_targets/).

use std::path::PathBuf;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn onnx_reader_regressions() {
    for (path, data) in inputs("onnx_reader") {
        let Ok(loaded) = qgraph_onnx::decode_model(&data) else {
            continue;
        };
        let bytes = qgraph_onnx::encode_model(&loaded.model)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let back =
            qgraph_onnx::decode_model(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(back.model == loaded.model, "{}", path.display());
    }
}

#[test]
fn text_parser_regressions() {
    let opts = qgraph_text::PrintOptions::with_all_data();
    for (path, data) in inputs("text_parser") {
        let Ok(src) = std::str::from_utf8(&data) else {
            continue;
        };
        let Ok(model) = qgraph_text::parse_model(src) else {
            continue;
        };
        let text = qgraph_text::print_model(&model, &opts);
        let again =
            qgraph_text::parse_model(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            qgraph_text::print_model(&again, &opts),
            text,
            "{}",
            path.display()
        );
    }
}
