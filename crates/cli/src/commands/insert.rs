//! `qgraph insert`: Q/DQ pairs by a scheme, calibrated on data.

use crate::common::{
    check_fits, check_writable, default_output, load, positive, sample_bar, BatchArgs, Failure,
    LimitArgs, NormArgs, Outcome,
};
use clap::ValueEnum;
use std::path::PathBuf;
use std::process::ExitCode;

/// Insert QuantizeLinear/DequantizeLinear pairs by a scheme, calibrating
/// activation ranges on data.
#[derive(clap::Args)]
#[command(after_help = "Schemes:\n  \
                  int8       TensorRT style: weights int8 symmetric per output channel (narrow grid \
                  [-127, 127]), activations int8 symmetric per tensor, zero points 0\n  \
                  int8-asym  ONNX Runtime style: weights as int8, activations uint8 asymmetric per tensor\n  \
                  wNaM       N-bit weights (symmetric, per channel), M-bit activations (unsigned, \
                  asymmetric), N and M from 2 to 8, e.g. w4a8, w2a2; the first and last weighted \
                  layers stay at 8 bits unless --low-bit-ends\n  \
                  pact-wNaM  as wNaM, activations on [0, alpha] (PACT): alpha the end of the calibrated range (--method), \
                  or 10 without data\n  \
                  lsq-wNaM   LSQ: one step per layer, s = 2<|v|>/sqrt(Qp) from the weights and the \
                  first calibration batch; weights on the full signed grid\n  \
                  dorefa-wNaM  DoReFa: activations on [0, 1] (the network's input keeps its own \
                  range), one weight scale per layer\n  \
                  The learned-range schemes place the same Q/DQ pairs; `qgraph train` learns them.\n\n\
                  Placement follows TensorRT: every input of Conv, ConvTranspose, Gemm and MatMul, and \
                  the residual input of an Add joining a convolution's branch; the outputs of \
                  weighted ops and everything else stay float. With --placement ort, as ONNX Runtime's \
                  quantize_static: every float tensor a quantizable op reads or writes, a Relu/Clip after \
                  a weighted op removed when the quantization range lies inside its bounds, and int32 \
                  biases: the graph ONNX Runtime fuses into its integer kernels, and the one \
                  `qgraph freeze --target integer` needs.\n\n\
                  The model records the scheme, the placement and the input normalisation \
                  (--norm), which eval, verify, report and train then use by default.\n\n\
                  Overrides (--overrides rules.toml), later rules winning:\n  \
                  [[override]]\n  name = \"^/classifier/\"   # regular expression over node names\n  \
                  exclude = true              # keep float\n  [[override]]\n  op = \"Conv\"\n  \
                  weight-bits = 8             # and/or activation-bits (2 to 16)\n\n\
                  Without --calib only weights are quantized (and any activation whose calibrated \
                  range the model records).\n\n\
                  Examples:\n  qgraph insert --scheme int8 model.onnx --calib photos.npz --norm imagenet\n  \
                  qgraph insert --scheme w4a8 model.onnx --calib data.npz --limit 256 --method percentile -o q.onnx\n  \
                  qgraph insert --scheme int8 model.onnx --calib photos/ --preprocess resize=256,crop=224,norm=imagenet")]
pub struct Args {
    /// The float model (.onnx or .qgt).
    model: PathBuf,
    /// Where to write the Q/DQ model (.onnx or .qgt), atomically
    /// [default: <model>.<scheme>.onnx beside the model].
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// The quantization scheme: int8, int8-asym or wNaM (see below).
    #[arg(long, default_value = "int8")]
    scheme: String,
    /// Where Q/DQ pairs go: TensorRT's rules, or ONNX Runtime's
    /// quantize_static (see below).
    #[arg(long, value_enum, default_value_t = PlacementArg::Tensorrt)]
    placement: PlacementArg,
    /// Calibration data: an .npz file (samples N first, uint8 or float32),
    /// or a folder of JPEG/PNG images (see --preprocess).
    #[arg(long, value_name = "FILE|DIR")]
    calib: Option<PathBuf>,
    /// For a folder of images: resize=N (shorter side), crop=N (centred
    /// square), norm=imagenet|tf|none, gray; e.g. "resize=256,crop=224,norm=imagenet".
    #[arg(long, value_name = "SPEC")]
    preprocess: Option<String>,
    /// The array of samples in --calib (default: x, else x_u8).
    #[arg(long)]
    key: Option<String>,
    #[command(flatten)]
    norm: NormArgs,
    #[command(flatten)]
    limit: LimitArgs,
    /// The old name of --limit.
    #[arg(long, value_name = "N", value_parser = positive, hide = true, conflicts_with = "limit")]
    calib_count: Option<usize>,
    /// How activation ranges are chosen from what calibration saw.
    #[arg(long, value_enum, default_value_t = MethodArg::Minmax)]
    method: MethodArg,
    /// The percentile for --method percentile, in (0, 100].
    #[arg(long, default_value_t = 99.99, allow_negative_numbers = true)]
    percentile: f64,
    #[command(flatten)]
    batch: BatchArgs,
    /// Per-layer rules (TOML): keep layers float or change their widths,
    /// by node name (regular expression) or op type; see below.
    #[arg(long, value_name = "FILE")]
    overrides: Option<PathBuf>,
    /// With a sub-8-bit scheme, quantize the first and last weighted
    /// layers at the scheme's width too (by default they stay at 8 bits).
    #[arg(long)]
    low_bit_ends: bool,
    /// Skip the passes run first (fold constants, batch normalization
    /// and zero pads; see `qgraph run --list`).
    #[arg(long)]
    no_prepare: bool,
    /// Leave batch normalization unfolded, for `qgraph train` to fold
    /// while training on batch statistics (Jacob et al. 2018).
    #[arg(long, conflicts_with = "no_prepare")]
    keep_bn: bool,
    /// Leave biases as they are (by default each Conv and Gemm bias
    /// absorbs the mean output shift its quantized weight causes on the
    /// calibration data).
    #[arg(long)]
    no_bias_correction: bool,
    /// How weights are rounded onto their grids when there is
    /// calibration data (without it, to nearest).
    #[arg(long, value_enum, default_value_t = RoundingArg::Auto)]
    rounding: RoundingArg,
    /// Round every scale to a power of two (per channel for weights: the
    /// one below or above, whichever quantizes the weights with less
    /// error; for activations by the calibration histogram). Products and
    /// sums of such dequantized values are exact in f32, so `qgraph
    /// freeze --target integer` computes exactly what the Q/DQ graph does,
    /// in every runtime; the grid is up to twice as coarse.
    #[arg(long)]
    pow2_scales: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum PlacementArg {
    /// TensorRT's Q/DQ placement rules.
    Tensorrt,
    /// ONNX Runtime's quantize_static (QDQ format).
    Ort,
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    /// The extremes seen.
    Minmax,
    /// The |x| below --percentile percent of the values.
    Percentile,
    /// TensorRT's entropy calibration (least KL divergence, 2048 bins).
    Entropy,
    /// The clipping threshold of least expected squared quantization error.
    Mse,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoundingArg {
    /// gptq for weights below 8 bits, nearest for 8 bits and more.
    Auto,
    /// Each weight to its nearest grid point.
    Nearest,
    /// Each output channel's weights together, so as to minimise the op's
    /// output error on the calibration data (GPTQ's optimal brain
    /// quantizer); needs --calib.
    Gptq,
}

pub fn run(args: Args) -> Outcome {
    // Everything about the options first, then the files, then the work.
    let mut scheme = qgraph::quant::Scheme::parse(&args.scheme)
        .map_err(|e| Failure(format!("--scheme: {e}")))?;
    if args.pow2_scales {
        if [scheme.weights.init, scheme.activations.init]
            .iter()
            .any(|&i| i != qgraph::quant::RangeInit::Observed)
        {
            return Err(Failure(format!(
                "--pow2-scales: the scheme '{}' learns its scales in training, which moves them off powers of two; use int8, int8-asym or wNaM",
                scheme.name
            )));
        }
        scheme.weights.pow2 = true;
        scheme.activations.pow2 = true;
    }
    if !(args.percentile > 0.0 && args.percentile <= 100.0) {
        return Err(Failure(format!(
            "--percentile must be in (0, 100], not {}",
            args.percentile
        )));
    }
    let (prep, prep_norm) =
        qgraph::data::Preprocess::parse(args.preprocess.as_deref().unwrap_or(""))
            .map_err(|e| Failure(format!("--preprocess: {e}")))?;
    let limit = args.limit.limit.or(args.calib_count);
    if args.calib.is_none() {
        for (given, flag) in [
            (limit.is_some(), "--limit"),
            (args.preprocess.is_some(), "--preprocess"),
            (args.key.is_some(), "--key"),
        ] {
            if given {
                return Err(Failure(format!(
                    "{flag} needs --calib (the calibration data)"
                )));
            }
        }
        if matches!(args.rounding, RoundingArg::Gptq) {
            return Err(Failure(
                "--rounding gptq needs --calib (the calibration data)".into(),
            ));
        }
    }
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(&args.model, &scheme.name));
    check_writable(&output)?;
    let overrides = match &args.overrides {
        None => Vec::new(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure(format!("{}: {e}", path.display())))?;
            qgraph::insert::parse_overrides(&text)
                .map_err(|e| Failure(format!("{}: {e}", path.display())))?
        }
    };
    let mut m = load(&args.model)?.model;
    let norm = match prep_norm {
        Some(n) => n,
        None => args.norm.resolve(&[(args.model.as_path(), &m)])?,
    };
    let data = match &args.calib {
        Some(path) if path.is_dir() => Some(qgraph::data::Dataset::load_images(path, prep)?),
        Some(path) => {
            if args.preprocess.is_some() {
                return Err(Failure(format!(
                    "--preprocess applies to a folder of images; {} is a file",
                    path.display()
                )));
            }
            Some(qgraph::data::Dataset::load_npz(
                path,
                args.key.as_deref(),
                Some(""),
            )?)
        }
        None => None,
    };
    if let (Some(ds), Some(path)) = (&data, &args.calib) {
        check_fits(ds, path, (&args.model, &m))?;
        ds.check_norm(norm)
            .map_err(|e| Failure(format!("{}: {e}", path.display())))?;
    }
    let options = qgraph::passes::InsertOptions {
        scheme,
        placement: match args.placement {
            PlacementArg::Tensorrt => qgraph::passes::Placement::TensorRt,
            PlacementArg::Ort => qgraph::passes::Placement::Ort,
        },
        ends_at_8_bits: !args.low_bit_ends,
        overrides,
    };
    let method = match args.method {
        MethodArg::Minmax => qgraph::insert::Method::MinMax,
        MethodArg::Percentile => qgraph::insert::Method::Percentile(args.percentile),
        MethodArg::Entropy => qgraph::insert::Method::Entropy,
        MethodArg::Mse => qgraph::insert::Method::Mse,
    };
    let calibration = data.as_ref().map(|ds| qgraph::insert::Calibration {
        data: ds,
        samples: qgraph::data::spread_samples(ds.len(), limit.unwrap_or(usize::MAX)),
        norm,
        batch: args.batch.batch,
        method,
        rounding: match args.rounding {
            RoundingArg::Auto => qgraph::insert::Rounding::GptqBelow8Bits,
            RoundingArg::Nearest => qgraph::insert::Rounding::Nearest,
            RoundingArg::Gptq => qgraph::insert::Rounding::Gptq,
        },
    });
    let total = calibration.as_ref().map_or(0, |c| c.samples.len());
    let bar = sample_bar(total, "calibrating ");
    let summary = qgraph::insert::insert(
        &mut m,
        &options,
        match (args.no_prepare, args.keep_bn) {
            (true, _) => qgraph::insert::Prepare::Skip,
            (false, true) => qgraph::insert::Prepare::KeepBatchNorm,
            (false, false) => qgraph::insert::Prepare::Deploy,
        },
        !args.no_bias_correction,
        calibration.as_ref(),
        |done| bar.set_position(done as u64),
    )
    .map_err(|e| e.in_file(&args.model))?;
    bar.finish_and_clear();
    if calibration.is_none() && args.norm.norm.is_some() {
        // No data to record it from: the flag says what the model expects.
        qgraph::data::record_norm(&mut m, norm);
    }
    qgraph::save(&m, &output, &qgraph::SaveOptions::default())?;
    for note in &summary.plan.notes {
        eprintln!("qgraph: note: {note}");
    }
    let r = &summary.report;
    let gains = &r.rounding_gains_db;
    let rounded = if !gains.is_empty() {
        format!(
            "; {} weights rounded for their ops' outputs (output error {:.1} dB below \
             nearest rounding, on average)",
            gains.len(),
            gains.iter().sum::<f64>() / gains.len() as f64
        )
    } else {
        String::new()
    };
    eprintln!(
        "qgraph: {} weights and {} activations quantized ({}); {} biases corrected{rounded}{}",
        r.weights,
        r.activations,
        summary.calibration,
        r.bias_corrected,
        if r.unranged.is_empty() {
            String::new()
        } else {
            // A transformer has dozens: name a few, count the rest.
            let shown = r.unranged.len().min(4);
            format!(
                "; {} activations left float without a range (give --calib): {}{}",
                r.unranged.len(),
                r.unranged[..shown].join(", "),
                if r.unranged.len() > shown {
                    format!(" and {} more", r.unranged.len() - shown)
                } else {
                    String::new()
                }
            )
        }
    );
    eprintln!("qgraph: wrote {}", output.display());
    Ok(ExitCode::SUCCESS)
}
