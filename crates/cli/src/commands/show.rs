//! `qgraph show`: a model in the text form.

use crate::common::{check_writable, emit, load, Outcome};
use std::path::PathBuf;
use std::process::ExitCode;

/// Print a model in qgraph's text form.
#[derive(clap::Args)]
#[command(
    after_help = "Tensors with more than 16 elements are shown by type, shape and a content digest \
                  (<blake3:...>) unless --all-data is given. A snapshot written with -o compares \
                  equal to the model it came from (`qgraph diff snap.qgt model.onnx`).\n\n\
                  Examples:\n  qgraph show model.onnx\n  qgraph show model.onnx | less\n  \
                  qgraph show model.onnx -o snap.qgt && qgraph diff snap.qgt model.onnx"
)]
pub struct Args {
    /// The model: .onnx, or the text form (.qgt).
    model: PathBuf,
    /// Print every tensor's values.
    #[arg(long)]
    all_data: bool,
    /// Write the text to this file (atomically) instead of standard output.
    #[arg(short, long)]
    output: Option<PathBuf>,
}

pub fn run(args: Args) -> Outcome {
    if let Some(path) = &args.output {
        check_writable(path)?;
    }
    let loaded = load(&args.model)?;
    let opts = if args.all_data {
        qgraph::text::PrintOptions::with_all_data()
    } else {
        qgraph::text::PrintOptions::default()
    };
    let text = qgraph::show(&loaded.model, &opts);
    match &args.output {
        Some(path) => qgraph::onnx::write_atomic(path, text.as_bytes())
            .map_err(|e| qgraph::Error::new(path, e))?,
        None => emit(&text)?,
    }
    Ok(ExitCode::SUCCESS)
}
