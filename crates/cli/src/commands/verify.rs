//! `qgraph verify`: a Q/DQ model and its frozen form compute the same.

use crate::common::{
    emit, load, load_data, sample_bar, BatchArgs, DataArgs, LimitArgs, NormArgs, Outcome,
};
use std::path::PathBuf;
use std::process::ExitCode;

/// Compare a Q/DQ model and its frozen form on data: per output, the
/// largest difference in quantization steps (LSB), the share of
/// elements within one step, and top-1 agreement.
#[derive(clap::Args)]
#[command(
    after_help = "An output's step is the scale of the DequantizeLinear that produces it, or, for \
                  a Conv/Gemm/MatMul reading dequantized values, the product of its input and \
                  weight scales. Op by op, each frozen op is given the reference's own integer \
                  inputs: equal or within one step is a correct freeze. End to end, the frozen \
                  model rounds where the Q/DQ model computes in float, and each one-step \
                  difference moves the layers after it: outputs of a deep network can drift \
                  many steps apart, and a classifier's top-1 class change where its margins \
                  are thin, while every op is exact. The report under the table explains its \
                  figures and gives a verdict.\n\n\
                  Examples:\n  qgraph verify q.onnx q.int.onnx --data photos.npz --limit 64"
)]
pub struct Args {
    /// The reference (Q/DQ) model.
    reference: PathBuf,
    /// The frozen model.
    frozen: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    norm: NormArgs,
    #[command(flatten)]
    limit: LimitArgs,
    #[command(flatten)]
    batch: BatchArgs,
}

pub fn run(args: Args) -> Outcome {
    let (r, f) = (load(&args.reference)?.model, load(&args.frozen)?.model);
    let ds = load_data(&args.data, Some(""), (&args.reference, &r))?;
    let norm = args
        .norm
        .resolve(&[(args.reference.as_path(), &r), (args.frozen.as_path(), &f)])?;
    let samples = args.limit.indices(ds.len());
    let bar = sample_bar(samples.len(), "");
    let found = qgraph::freeze::verify(&r, &f, &ds, &samples, norm, args.batch.batch, |done| {
        bar.set_position(done as u64)
    })
    .map_err(|e| e.in_file(&args.frozen))?;
    bar.finish_and_clear();
    emit(&qgraph::freeze::verify_table(&found))?;
    Ok(ExitCode::SUCCESS)
}
