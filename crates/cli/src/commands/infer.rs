//! `qgraph infer`: a model's outputs on given inputs.

use crate::common::{check_writable, load, Outcome};
use std::path::PathBuf;
use std::process::ExitCode;

/// Run a model on inputs from an .npz file and write its outputs to one.
#[derive(clap::Args)]
#[command(
    after_help = "The input file holds one float32 array per model input, named as the input; \
                  the output file gets one array per model output, named as the output.\n\n\
                  Examples:\n  qgraph infer model.onnx --inputs batch.npz -o outputs.npz\n  \
                  python3 -c \"import numpy as np; print(np.load('outputs.npz')['logits'])\""
)]
pub struct Args {
    /// The model to run (.onnx or .qgt).
    model: PathBuf,
    /// The inputs (.npz).
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write the outputs (.npz), atomically.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(args: Args) -> Outcome {
    check_writable(&args.output)?;
    let loaded = load(&args.model)?;
    qgraph::data::infer_npz(&loaded.model, &args.inputs, &args.output)
        .map_err(|e| e.in_file(&args.model))?;
    Ok(ExitCode::SUCCESS)
}
