//! `qgraph report`: where a quantized model loses accuracy, layer by layer.

use crate::common::{
    check_writable, emit, load, load_data, sample_bar, BatchArgs, DataArgs, Failure, LimitArgs,
    NormArgs, Outcome,
};
use std::path::PathBuf;
use std::process::ExitCode;

/// Per-layer error of a quantized model: the SQNR of each quantized
/// tensor against its float twin, worst first, as a table and a chart.
#[derive(clap::Args)]
#[command(
    after_help = "Each quantized tensor (a DequantizeLinear whose QuantizeLinear reads a value the float \
                  model also has) is compared with the float model's value on the same samples, so \
                  errors growing through the network show where they grow; weights are compared \
                  with the float values they quantize. The worst tensors head the table: that is \
                  where to look (or to keep at higher precision).\n\n\
                  Examples:\n  qgraph report float.onnx q.onnx --data photos.npz --svg layers.svg\n  \
                  qgraph report float.onnx q.onnx --data photos.npz --limit 32 | head"
)]
pub struct Args {
    /// The float model (.onnx or .qgt).
    float: PathBuf,
    /// The quantized (Q/DQ) model.
    quantized: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    norm: NormArgs,
    #[command(flatten)]
    limit: LimitArgs,
    #[command(flatten)]
    batch: BatchArgs,
    /// Also write the chart as SVG (in graph order), atomically.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

pub fn run(args: Args) -> Outcome {
    if let Some(path) = &args.svg {
        check_writable(path)?;
    }
    let (f, q) = (load(&args.float)?.model, load(&args.quantized)?.model);
    let ds = load_data(&args.data, Some(""), (&args.float, &f))?;
    let norm = args
        .norm
        .resolve(&[(args.quantized.as_path(), &q), (args.float.as_path(), &f)])?;
    let samples = args.limit.indices(ds.len());
    let bar = sample_bar(samples.len(), "");
    let rows = qgraph::report::report(&f, &q, &ds, &samples, norm, args.batch.batch, |done| {
        bar.set_position(done as u64)
    })
    .map_err(|e| e.in_file(&args.quantized))?;
    bar.finish_and_clear();
    if let Some(path) = &args.svg {
        let chart = qgraph::report::svg(&rows, &args.quantized.display().to_string());
        qgraph::onnx::write_atomic(path, chart.as_bytes())
            .map_err(|e| Failure(format!("{}: {e}", path.display())))?;
    }
    emit(&qgraph::report::table(&rows))?;
    Ok(ExitCode::SUCCESS)
}
