//! Any text: the parser returns a model or an error, never panics; a model
//! it accepts prints to text that parses and prints the same again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(model) = qgraph_text::parse_model(src) else {
        return;
    };
    let opts = qgraph_text::PrintOptions::with_all_data();
    let text = qgraph_text::print_model(&model, &opts);
    let again = qgraph_text::parse_model(&text).expect("printed text parses");
    assert_eq!(qgraph_text::print_model(&again, &opts), text, "print -> parse -> print changed the text");
});
