//! `qgraph infer`: a model's outputs on given inputs.

use crate::common::{check_writable, load, Outcome};
use std::path::PathBuf;
use std::process::ExitCode;

/// Run a model on inputs from an .npz file and write its outputs to one.
#[derive(clap::Args)]
#[command(
    after_help = "Inputs and outputs are either .npz files (one array per model input or output, \
                  named as it, of the declared type) or ONNX test data set directories \
                  (input_0.pb, input_1.pb, ... in; output_0.pb, ... out: serialized TensorProtos, \
                  which hold every ONNX type).\n\n\
                  Examples:\n  qgraph infer model.onnx --inputs batch.npz -o outputs.npz\n  \
                  python3 -c \"import numpy as np; print(np.load('outputs.npz')['logits'])\""
)]
pub struct Args {
    /// The model to run (.onnx or .qgt).
    model: PathBuf,
    /// The inputs: an .npz file, or a directory of input_<n>.pb files.
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write the outputs: an .npz file, or else a directory that
    /// gets output_<n>.pb files; each file written atomically.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(args: Args) -> Outcome {
    // A directory output (the ONNX test data set form) may exist already.
    if !args.output.is_dir() {
        check_writable(&args.output)?;
    }
    let loaded = load(&args.model)?;
    qgraph::infer::infer(&loaded.model, &args.inputs, &args.output)
        .map_err(|e| e.in_file(&args.model))?;
    Ok(ExitCode::SUCCESS)
}
