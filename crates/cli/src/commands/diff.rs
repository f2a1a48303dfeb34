//! `qgraph diff`: what changed between two models.

use crate::common::{emit, load, Outcome};
use std::path::PathBuf;
use std::process::ExitCode;

/// Show what changed between two models; exit 1 when they differ.
#[derive(clap::Args)]
#[command(
    after_help = "Nodes are matched by name (unnamed ones by their first output); initializers by \
                  name, with the largest absolute difference of their values. A snapshot's \
                  digests (`qgraph show -o snap.qgt`) compare with the values they digest.\n\n\
                  Examples:\n  qgraph diff float.onnx quantized.onnx\n  \
                  qgraph diff expected.qgt actual.onnx || echo \"the models differ\""
)]
pub struct Args {
    /// The model before (.onnx or .qgt).
    a: PathBuf,
    /// The model after (.onnx or .qgt).
    b: PathBuf,
}

pub fn run(args: Args) -> Outcome {
    let (ma, mb) = (load(&args.a)?, load(&args.b)?);
    let d = qgraph::diff::diff_models(&ma.model, &mb.model);
    if d.is_empty() {
        emit("no differences\n")?;
        Ok(ExitCode::SUCCESS)
    } else {
        emit(&d.render(&args.a.display().to_string(), &args.b.display().to_string()))?;
        Ok(ExitCode::from(1))
    }
}
