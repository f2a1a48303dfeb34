//! `qgraph freeze`: the graph a runtime deploys.

use crate::common::{check_writable, default_output, load, Outcome};
use clap::ValueEnum;
use std::path::PathBuf;
use std::process::ExitCode;

/// Turn a Q/DQ model into the graph a runtime deploys: integer weights,
/// Q/DQ pairs where the target fuses them, or integer operators.
#[derive(clap::Args)]
#[command(after_help = "Targets:\n  \
                  tensorrt  weights stored as int8 (int4 packed two per byte, low nibble first, at \
                  opset 21, for 4-bit weights) behind DequantizeLinear, the weights' QuantizeLinear \
                  folded away; DequantizeLinear moved below Reshape, Flatten, Squeeze, Unsqueeze, \
                  Transpose, MaxPool and Concat (equal scales); Q/DQ round trips removed; biases \
                  stay float\n  \
                  ort       the same, for ONNX Runtime's QDQ fusions (freeze a model inserted with \
                  --placement ort)\n  \
                  integer   QLinearConv / QLinearMatMul / MatMulInteger and the com.microsoft QLinear \
                  ops ONNX Runtime runs, integers between the input's QuantizeLinear and the \
                  output's DequantizeLinear; ops that cannot be made integer are named and keep \
                  their Q/DQ boundary (needs a model inserted with --placement ort; insert with \
                  --pow2-scales too and the integer graph computes the Q/DQ graph's values bit for bit)\n  \
                  integer-onnx  the same with operators of the ONNX standard only (for tract and other \
                  runtimes): Gemm as a 1x1 QLinearConv or MatMulInteger; Add, pooling and the like keep \
                  their Q/DQ boundary\n\n\
                  A float model, and a model an integer target cannot make integer, are refused \
                  with the fix. `qgraph verify q.onnx frozen.onnx --data ...` shows that both \
                  compute the same.\n\n\
                  Examples:\n  qgraph freeze --target tensorrt q.onnx\n  \
                  qgraph freeze --target integer q_ort.onnx -o q.int.onnx")]
pub struct Args {
    /// The Q/DQ model (from `qgraph insert` or `qgraph train`).
    model: PathBuf,
    /// Where to write the frozen model, atomically
    /// [default: <model>.<target>.onnx beside the model].
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// The runtime to shape the graph for.
    #[arg(long, value_enum, default_value_t = TargetArg::Tensorrt)]
    target: TargetArg,
    /// How to store weights whose integers fit 4 bits.
    #[arg(long, value_enum, default_value_t = Int4Arg::Auto)]
    int4: Int4Arg,
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetArg {
    /// TensorRT: int8/int4 weights behind DequantizeLinear, float biases.
    Tensorrt,
    /// ONNX Runtime's QDQ fusions.
    Ort,
    /// Integer operators only, between input and output.
    Integer,
    /// Integer operators of the ONNX standard only (no com.microsoft ops):
    /// for tract and other runtimes; Add and pooling stay float between Q/DQ.
    IntegerOnnx,
}

#[derive(Clone, Copy, ValueEnum)]
enum Int4Arg {
    /// Packed as int4/uint4 (opset 21) when the model's scheme has weights
    /// of 4 bits or fewer and the model can move to opset 21; int8
    /// otherwise, with a note.
    Auto,
    /// Packed as int4/uint4 (opset 21) whatever the scheme says; an error
    /// when the model cannot move to opset 21.
    Always,
    /// Kept in int8.
    Never,
}

pub fn run(args: Args) -> Outcome {
    let (target, name) = match args.target {
        TargetArg::Tensorrt => (qgraph::freeze::Target::TensorRt, "tensorrt"),
        TargetArg::Ort => (qgraph::freeze::Target::Ort, "ort"),
        TargetArg::Integer => (qgraph::freeze::Target::Integer, "integer"),
        TargetArg::IntegerOnnx => (qgraph::freeze::Target::IntegerOnnx, "integer-onnx"),
    };
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(&args.model, name));
    check_writable(&output)?;
    let mut m = load(&args.model)?.model;
    let int4 = match args.int4 {
        Int4Arg::Auto => qgraph::freeze::Int4::Auto,
        Int4Arg::Always => qgraph::freeze::Int4::Always,
        Int4Arg::Never => qgraph::freeze::Int4::Never,
    };
    let frozen =
        qgraph::freeze::freeze(&mut m, target, int4).map_err(|e| e.in_file(&args.model))?;
    qgraph::save(&m, &output, &qgraph::SaveOptions::default())?;
    eprintln!(
        "qgraph: frozen by {}",
        if frozen.changed.is_empty() {
            "nothing (no pass changed the model)".to_string()
        } else {
            frozen.changed.join(", ")
        }
    );
    for note in &frozen.notes {
        eprintln!("qgraph: note: {note}");
    }
    if !frozen.float_ops.is_empty() {
        let ops: Vec<String> = frozen
            .float_ops
            .iter()
            .map(|(op, n)| format!("{op} ({n})"))
            .collect();
        eprintln!(
            "qgraph: still float, between DequantizeLinear and QuantizeLinear: {}",
            ops.join(", ")
        );
    }
    eprintln!("qgraph: wrote {}", output.display());
    Ok(ExitCode::SUCCESS)
}
