//! Any bytes: the ONNX reader returns a model or an error, never panics; a
//! model it accepts writes, reads back equal, and prints.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(loaded) = qgraph_onnx::decode_model(data) else {
        return;
    };
    let bytes = qgraph_onnx::encode_model(&loaded.model).expect("a verified model can be written");
    let back = qgraph_onnx::decode_model(&bytes).expect("what qgraph writes, qgraph reads");
    assert!(back.model == loaded.model, "write -> read changed the model");
    let _ = qgraph_text::print_model(&back.model, &qgraph_text::PrintOptions::default());
});
