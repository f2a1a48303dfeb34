//! The `qgraph` command. Exit codes: 0 ok, 1 differences found (`diff`),
//! 2 bad input or usage.

use clap::{Parser, Subcommand, ValueEnum};

// mimalloc keeps freed pages for the next allocation: tensors of megabytes
// allocated and freed at every step otherwise go back to the system and
// cost a page fault per 4 KiB when touched again (measured on training).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (v3, the version the crate builds;
/// the bindings have no constant for it): how long freed memory waits
/// before it is given back to the system, in milliseconds; -1 never.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory stays with the process. mimalloc gives it back after a
/// second by default; a training step of MobileNetV2 at batch 32 takes
/// longer, so every step faulted its activations in afresh and the kernel
/// zeroed each page: up to half the run's time, 5-8 samples/s against
/// 10-13 with this (four runs each, interleaved). The resident size is the
/// peak either way.
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: sets one integer option of the allocator; called first in
    // main, before any other thread exists (mi_option_set is not thread
    // safe), with an option index inside mimalloc's table.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "qgraph",
    version,
    about = "Quantize ONNX models: insert, calibrate, train and freeze Q/DQ graphs",
    after_help = "Exit codes: 0 success, 1 differences found (diff), 2 bad input or usage.\n\n\
                  Examples:\n  qgraph show model.onnx\n  qgraph convert model.onnx -o model.qgt\n  qgraph diff float.onnx quantized.onnx"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model in qgraph's text form.
    #[command(
        after_help = "Tensors with more than 16 elements are shown by type, shape and a content digest \
                      (<blake3:...>) unless --all-data is given.\n\n\
                      Examples:\n  qgraph show model.onnx\n  qgraph show model.onnx | less\n  \
                      qgraph show --all-data model.onnx -o model.qgt"
    )]
    Show {
        /// The model: .onnx, or the text form (.qgt).
        model: PathBuf,
        /// Print every tensor's values.
        #[arg(long)]
        all_data: bool,
        /// Write the text to this file (atomically) instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Show what changed between two models; exit 1 when they differ.
    #[command(
        after_help = "Nodes are matched by name (unnamed ones by their first output); initializers by \
                      name, with the largest absolute difference of their values.\n\n\
                      Examples:\n  qgraph diff float.onnx quantized.onnx\n  \
                      qgraph diff expected.qgt actual.onnx || echo \"the models differ\""
    )]
    Diff {
        /// The model before (.onnx or .qgt).
        a: PathBuf,
        /// The model after (.onnx or .qgt).
        b: PathBuf,
    },
    /// Read, verify and write a model (ONNX or the text form, by extension).
    #[command(
        after_help = "The output is written to a temporary file and renamed into place, so it is \
                      never half-written. Writing is deterministic: the same input gives the same bytes.\n\n\
                      Examples:\n  qgraph convert model.onnx -o checked.onnx\n  \
                      qgraph convert model.onnx -o model.qgt --all-data\n  \
                      qgraph convert fixture.qgt -o fixture.onnx\n  \
                      qgraph convert big.onnx -o out.onnx --external-data always"
    )]
    Convert {
        /// The model to read (.onnx or .qgt).
        input: PathBuf,
        /// Where to write: .onnx, or .qgt for the text form.
        #[arg(short, long)]
        output: PathBuf,
        /// Where tensor data goes in an ONNX output: inline unless the model
        /// passes protobuf's 2 GiB limit (auto), always in `<output>.data`, or never.
        #[arg(long, value_enum, default_value_t = ExternalArg::Auto)]
        external_data: ExternalArg,
        /// For a text output: print every tensor's values.
        #[arg(long)]
        all_data: bool,
    },
    /// Run a pipeline of graph passes over a model.
    #[command(
        after_help = "A pipeline is a comma-separated list of passes, each with optional parameters \
                      in parentheses; `cleanup` stands for `remove-noops,dce`. `--list` shows every pass. \
                      The model is verified after each pass; an error names the pass.\n\n\
                      Examples:\n  qgraph run --passes \"fold-constants,fold-bn,cleanup\" model.onnx -o folded.onnx\n  \
                      qgraph run --passes \"fold-constants(max-elements=4096),dce\" model.onnx -o out.onnx --dump-after dumps/\n  \
                      qgraph run --passes fold-bn model.onnx -o out.onnx --rewrite-limit 3   # bisect a bad rewrite\n  \
                      qgraph run --list"
    )]
    Run {
        /// The model to read (.onnx or .qgt).
        #[arg(required_unless_present = "list")]
        input: Option<PathBuf>,
        /// The pipeline, e.g. "fold-constants,fold-bn,cleanup".
        #[arg(long, required_unless_present = "list")]
        passes: Option<String>,
        /// Where to write the result: .onnx, or .qgt for the text form.
        #[arg(short, long, required_unless_present = "list")]
        output: Option<PathBuf>,
        /// Write the text form of the model after each pass into this
        /// folder, as NN-<pass>.qgt.
        #[arg(long, value_name = "DIR")]
        dump_after: Option<PathBuf>,
        /// Stop rewriting after this many rewrites in total (to find the
        /// rewrite that breaks a model).
        #[arg(long, value_name = "N")]
        rewrite_limit: Option<usize>,
        /// Repeat the pipeline until it changes nothing, at most N times.
        #[arg(long, value_name = "N", default_value_t = 1)]
        fixpoint: usize,
        /// List the passes and exit.
        #[arg(long)]
        list: bool,
    },
    /// Insert QuantizeLinear/DequantizeLinear pairs by a scheme, calibrating
    /// activation ranges on data.
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
                      biases: the graph ONNX Runtime fuses into its integer kernels.\n\n\
                      Overrides (--overrides rules.toml), later rules winning:\n  \
                      [[override]]\n  name = \"^/classifier/\"   # regular expression over node names\n  \
                      exclude = true              # keep float\n  [[override]]\n  op = \"Conv\"\n  \
                      weight-bits = 8             # and/or activation-bits (2 to 16)\n\n\
                      Without --calib only weights are quantized (and any activation whose calibrated \
                      range the model records).\n\n\
                      Examples:\n  qgraph insert --scheme int8 model.onnx --calib photos.npz --norm imagenet -o q.onnx\n  \
                      qgraph insert --scheme w4a8 model.onnx --calib data.npz --calib-count 256 --method percentile -o q.onnx\n  \
                      qgraph insert --scheme int8 model.onnx --calib photos/ --preprocess resize=256,crop=224,norm=imagenet -o q.onnx")]
    Insert {
        /// The float model (.onnx or .qgt).
        model: PathBuf,
        /// Where to write the Q/DQ model (.onnx or .qgt), atomically.
        #[arg(short, long)]
        output: PathBuf,
        /// The quantization scheme: int8, int8-asym or wNaM (see below).
        #[arg(long, default_value = "int8")]
        scheme: String,
        /// Where Q/DQ pairs go: TensorRT's rules, or ONNX Runtime's
        /// quantize_static (see below).
        #[arg(long, value_enum, default_value_t = PlacementArg::Tensorrt)]
        placement: PlacementArg,
        /// Calibration data: an .npz file (samples N first, uint8 or float32),
        /// or a folder of JPEG/PNG images (see --preprocess).
        #[arg(long)]
        calib: Option<PathBuf>,
        /// For a folder of images: resize=N (shorter side), crop=N (centred
        /// square), norm=imagenet|tf|none, gray; e.g. "resize=256,crop=224,norm=imagenet".
        #[arg(long, value_name = "SPEC")]
        preprocess: Option<String>,
        /// The array of samples in --calib (default: x, else x_u8).
        #[arg(long)]
        key: Option<String>,
        /// Input normalisation of the calibration samples.
        #[arg(long, value_enum, default_value_t = NormArg::None)]
        norm: NormArg,
        /// Calibrate on N samples spread evenly over the file (default: all).
        #[arg(long, value_name = "N")]
        calib_count: Option<usize>,
        /// How activation ranges are chosen from what calibration saw.
        #[arg(long, value_enum, default_value_t = MethodArg::Minmax)]
        method: MethodArg,
        /// The percentile for --method percentile.
        #[arg(long, default_value_t = 99.99)]
        percentile: f64,
        /// Samples per calibration batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
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
    },
    /// Per-layer error of a quantized model: the SQNR of each quantized
    /// tensor against its float twin, worst first, as a table and a chart.
    #[command(
        after_help = "Each quantized tensor (a DequantizeLinear whose QuantizeLinear reads a value the float \
                      model also has) is compared with the float model's value on the same samples, so \
                      errors growing through the network show where they grow; weights are compared \
                      with the float values they quantize. The worst tensors head the table: that is \
                      where to look (or to keep at higher precision).\n\n\
                      Examples:\n  qgraph report float.onnx q.onnx --data photos.npz --norm imagenet --svg layers.svg\n  \
                      qgraph report float.onnx q.onnx --data photos.npz --norm imagenet --limit 32 | head"
    )]
    Report {
        /// The float model (.onnx or .qgt).
        float: PathBuf,
        /// The quantized (Q/DQ) model.
        quantized: PathBuf,
        /// The data set (.npz).
        #[arg(long)]
        data: PathBuf,
        /// The array of samples (default: x, else x_u8).
        #[arg(long)]
        key: Option<String>,
        /// Input normalisation.
        #[arg(long, value_enum, default_value_t = NormArg::None)]
        norm: NormArg,
        /// Use N samples spread evenly over the file (default: 64).
        #[arg(long, default_value_t = 64)]
        limit: usize,
        /// Samples per batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Also write the chart as SVG (in graph order), atomically.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
    /// Turn a Q/DQ model into the graph a runtime deploys: integer weights,
    /// Q/DQ pairs where the target fuses them, or integer operators.
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
                      their Q/DQ boundary (freeze a model inserted with --placement ort; insert with \
                      --pow2-scales too and the integer graph computes the Q/DQ graph's values bit for bit)\n  \
                      integer-onnx  the same with operators of the ONNX standard only (for tract and other \
                      runtimes): Gemm as a 1x1 QLinearConv or MatMulInteger; Add, pooling and the like keep \
                      their Q/DQ boundary\n\n\
                      `qgraph verify q.onnx frozen.onnx --data ...` shows that both compute the same.\n\n\
                      Examples:\n  qgraph freeze --target tensorrt q.onnx -o q.trt.onnx\n  \
                      qgraph freeze --target integer q_ort.onnx -o q.int.onnx")]
    Freeze {
        /// The Q/DQ model (from `qgraph insert` or `qgraph train`).
        model: PathBuf,
        /// Where to write the frozen model, atomically.
        #[arg(short, long)]
        output: PathBuf,
        /// The runtime to shape the graph for.
        #[arg(long, value_enum, default_value_t = TargetArg::Tensorrt)]
        target: TargetArg,
        /// Pack weights whose integers fit 4 bits as int4/uint4 (opset 21):
        /// auto does so when the model's scheme has weights of 4 bits or
        /// fewer.
        #[arg(long, value_enum, default_value_t = Int4Arg::Auto)]
        int4: Int4Arg,
    },
    /// Compare a Q/DQ model and its frozen form on data: per output, the
    /// largest difference in quantization steps (LSB), the share of
    /// elements within one step, and top-1 agreement.
    #[command(
        after_help = "An output's step is the scale of the DequantizeLinear that produces it, or, for \
                      a Conv/Gemm/MatMul reading dequantized values, the product of its input and \
                      weight scales.\n\n\
                      Examples:\n  qgraph verify q.onnx q.int.onnx --data photos.npz --norm imagenet"
    )]
    Verify {
        /// The reference (Q/DQ) model.
        reference: PathBuf,
        /// The frozen model.
        frozen: PathBuf,
        /// The data set (.npz).
        #[arg(long)]
        data: PathBuf,
        /// The array of samples (default: x, else x_u8).
        #[arg(long)]
        key: Option<String>,
        /// Input normalisation.
        #[arg(long, value_enum, default_value_t = NormArg::None)]
        norm: NormArg,
        /// Use N samples spread evenly over the file (default: all).
        #[arg(long)]
        limit: Option<usize>,
        /// Samples per batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
    },
    /// Run a model on inputs from an .npz file and write its outputs to one.
    #[command(
        after_help = "The input file holds one float32 array per model input, named as the input; \
                      the output file gets one array per model output, named as the output.\n\n\
                      Examples:\n  qgraph infer model.onnx --inputs batch.npz -o outputs.npz\n  \
                      python3 -c \"import numpy as np; print(np.load('outputs.npz')['logits'])\""
    )]
    Infer {
        /// The model to run (.onnx or .qgt).
        model: PathBuf,
        /// The inputs (.npz).
        #[arg(long)]
        inputs: PathBuf,
        /// Where to write the outputs (.npz), atomically.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Run a model on a data set: accuracy, top-1 agreement and output SQNR
    /// against a reference model.
    #[command(
        after_help = "The data set is an .npz file with samples (N first; uint8 or float32) and, \
                      optionally, int64 labels. The model's first output is read as class scores.\n\n\
                      Examples:\n  qgraph eval lenet.onnx --data mnist.npz\n  \
                      qgraph eval quant.onnx --data photos.npz --key x_u8 --norm imagenet --ref float.onnx"
    )]
    Eval {
        /// The model to run (.onnx or .qgt).
        model: PathBuf,
        /// The data set (.npz).
        #[arg(long)]
        data: PathBuf,
        /// The array of samples (default: x, else x_u8).
        #[arg(long)]
        key: Option<String>,
        /// The array of labels (default: y when present).
        #[arg(long, conflicts_with = "no_labels")]
        labels: Option<String>,
        /// Ignore labels even if the file has them.
        #[arg(long)]
        no_labels: bool,
        /// Input normalisation.
        #[arg(long, value_enum, default_value_t = NormArg::None)]
        norm: NormArg,
        /// A reference model (usually the float one) to compare with.
        #[arg(long = "ref")]
        reference: Option<PathBuf>,
        /// Samples per batch.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Use only the first N samples.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Quantization-aware training of a Q/DQ model (or training of a float
    /// one), with labels or distilled from a teacher model.
    #[command(
        after_help = "Q/DQ pairs train as fake quantization with straight-through gradients. \
                      How scales move follows the scheme 'qgraph insert' recorded: lsq-* learns \
                      every step size (LSQ, gradient scaled by 1/sqrt(N Qp)); pact-* learns the \
                      activations' clipping levels (PACT, with L2 decay --pact-decay); other \
                      schemes keep weight scales at each channel's extremes and the calibrated \
                      activation ranges, or move them by a moving average with --range-ema \
                      (Jacob et al. 2018). Batch normalization uses \
                      batch statistics and updates its running ones until --bn-freeze. A batch \
                      normalization after a convolution with a quantized weight (from 'qgraph \
                      insert --keep-bn') is folded into it while training (Jacob et al. 2018): the \
                      quantizer sees the folded weight, and the output holds the folded \
                      convolution; --bn separate keeps it a layer of its own. Without \
                      labels (or with --teacher) the loss is distillation from the teacher's \
                      outputs. The output is the input graph with the trained values, ready for \
                      'qgraph freeze'. A checkpoint is written after each epoch; --resume \
                      continues from it.\n\n\
                      Examples:\n  qgraph train cnn.onnx --data train.npz --eval test.npz --epochs 5 --lr 0.05 -o trained.onnx\n  \
                      qgraph train qdq.onnx --data photos.npz --key x_u8 --norm imagenet --teacher float.onnx \\\n      \
                      --optimizer adam --lr 1e-5 --schedule sine --epochs 2 -o qat.onnx"
    )]
    Train {
        /// The model to train (.onnx or .qgt): Q/DQ or float.
        model: PathBuf,
        /// Training data (.npz: samples N first, uint8 or float32; labels).
        #[arg(long)]
        data: PathBuf,
        /// The array of samples (default: x, else x_u8).
        #[arg(long)]
        key: Option<String>,
        /// The array of labels (default: y when present).
        #[arg(long)]
        labels: Option<String>,
        /// Input normalisation.
        #[arg(long, value_enum, default_value_t = NormArg::None)]
        norm: NormArg,
        /// Distil from this model (usually the float one) instead of labels.
        #[arg(long)]
        teacher: Option<PathBuf>,
        /// Evaluation data, measured after each epoch (same key and labels).
        #[arg(long)]
        eval: Option<PathBuf>,
        /// Evaluate on the first N samples only.
        #[arg(long)]
        eval_limit: Option<usize>,
        #[arg(long, default_value_t = 1)]
        epochs: usize,
        /// Samples per step.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Base learning rate.
        #[arg(long, default_value_t = 0.01)]
        lr: f32,
        #[arg(long, value_enum, default_value_t = OptimizerArg::Sgd)]
        optimizer: OptimizerArg,
        /// SGD momentum.
        #[arg(long, default_value_t = 0.9)]
        momentum: f32,
        /// L2 decay on weights (decoupled for Adam).
        #[arg(long, default_value_t = 0.0)]
        weight_decay: f32,
        /// PACT's L2 decay on its clipping levels.
        #[arg(long, default_value_t = 2e-4)]
        pact_decay: f32,
        /// constant, cosine, sine (lr = base sin(pi t / T)) or step:EVERY:GAMMA (steps).
        #[arg(long, default_value = "constant")]
        schedule: String,
        /// Batch normalization freezes its statistics after this many steps,
        /// or "never" (default: never, or half-way through when batch
        /// normalization folds into convolutions).
        #[arg(long, value_name = "STEPS|never", value_parser = parse_bn_freeze)]
        bn_freeze: Option<usize>,
        /// A batch normalization after a convolution with a quantized
        /// weight: folded into it while training, or kept separate.
        #[arg(long, value_enum, default_value_t = BnArg::Fold)]
        bn: BnArg,
        /// Fake quantization starts after this many steps.
        #[arg(long, default_value_t = 0)]
        quant_delay: usize,
        /// Distillation temperature.
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        /// Online activation ranges for schemes that do not learn them: a
        /// moving average of the batches' extremes with this weight on the
        /// old range (e.g. 0.99). Default: the calibrated ranges stay.
        #[arg(long)]
        range_ema: Option<f32>,
        /// Seed of the sample order.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Worker threads (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Train on the first N samples only.
        #[arg(long)]
        limit: Option<usize>,
        /// Checkpoint file (default: the output with .ckpt before its extension).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Continue from the checkpoint when it exists.
        #[arg(long)]
        resume: bool,
        /// Where to write the trained model, atomically.
        #[arg(short, long)]
        output: PathBuf,
    },
}

/// `--bn-freeze`: a step count, or "never".
fn parse_bn_freeze(text: &str) -> Result<usize, String> {
    match text {
        "never" => Ok(usize::MAX),
        _ => text
            .parse()
            .map_err(|_| format!("'{text}' is neither a step count nor 'never'")),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum BnArg {
    Fold,
    Separate,
}

#[derive(Clone, Copy, ValueEnum)]
enum OptimizerArg {
    /// SGD with momentum.
    Sgd,
    /// Adam with decoupled weight decay.
    Adam,
}

impl From<NormArg> for qgraph::data::Norm {
    fn from(n: NormArg) -> Self {
        match n {
            NormArg::Imagenet => qgraph::data::Norm::Imagenet,
            NormArg::Tf => qgraph::data::Norm::Tf,
            NormArg::None => qgraph::data::Norm::None,
        }
    }
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
    /// When the model's scheme has weights of 4 bits or fewer.
    Auto,
    Always,
    Never,
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

#[derive(Clone, Copy, ValueEnum)]
enum NormArg {
    /// Per-channel ImageNet mean/std after scaling uint8 to [0, 1].
    Imagenet,
    /// (x_u8 - 127) / 128, as TensorFlow models expect.
    Tf,
    /// uint8 scaled to [0, 1]; float data as stored.
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExternalArg {
    Auto,
    Always,
    Never,
}

/// A failure to report: exit 2 with the message.
struct Failure(String);

impl From<qgraph::Error> for Failure {
    fn from(e: qgraph::Error) -> Failure {
        Failure(e.to_string())
    }
}

fn load(path: &Path) -> Result<qgraph::Loaded, Failure> {
    let loaded = qgraph::load(path)?;
    for w in &loaded.warnings {
        eprintln!("qgraph: warning: {}: {w}", path.display());
    }
    Ok(loaded)
}

/// Writes to standard output; a closed pipe (`qgraph show m.onnx | head`)
/// ends the program quietly rather than with an error.
/// A progress bar over `total` samples, its line starting with `label`.
fn sample_bar(total: usize, label: &str) -> indicatif::ProgressBar {
    indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{label}{{bar:40}} {{pos}}/{{len}} samples {{per_sec}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    )
}

fn emit(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure(format!("cannot write to standard output: {e}"))),
    }
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    match cli.command {
        Command::Show {
            model,
            all_data,
            output,
        } => {
            let loaded = load(&model)?;
            let opts = if all_data {
                qgraph::text::PrintOptions::with_all_data()
            } else {
                qgraph::text::PrintOptions::default()
            };
            let text = qgraph::show(&loaded.model, &opts);
            match output {
                Some(path) => qgraph::onnx::write_atomic(&path, text.as_bytes())
                    .map_err(|e| Failure(format!("{}: {e}", path.display())))?,
                None => emit(&text)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff { a, b } => {
            let (ma, mb) = (load(&a)?, load(&b)?);
            let d = qgraph::diff::diff_models(&ma.model, &mb.model);
            if d.is_empty() {
                emit("no differences\n")?;
                Ok(ExitCode::SUCCESS)
            } else {
                emit(&d.render(&a.display().to_string(), &b.display().to_string()))?;
                Ok(ExitCode::from(1))
            }
        }
        Command::Infer {
            model,
            inputs,
            output,
        } => {
            let loaded = load(&model)?;
            qgraph::data::infer_npz(&loaded.model, &inputs, &output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval {
            model,
            data,
            key,
            labels,
            no_labels,
            norm,
            reference,
            batch,
            limit,
        } => {
            let loaded = load(&model)?;
            let reference = reference.map(|r| load(&r).map(|l| (r, l))).transpose()?;
            let labels = if no_labels {
                Some("")
            } else {
                labels.as_deref()
            };
            let ds = qgraph::data::Dataset::load_npz(&data, key.as_deref(), labels)?;
            let norm = norm.into();
            let total = limit.unwrap_or(usize::MAX).min(ds.len());
            let bar = sample_bar(total, "");
            let m = qgraph::data::measure(
                &loaded.model,
                reference.as_ref().map(|(_, l)| &l.model),
                &ds,
                norm,
                batch,
                limit,
                |done| bar.set_position(done as u64),
            )
            .map_err(|e| Failure(format!("{}: {e}", model.display())))?;
            bar.finish_and_clear();
            let mut text = format!(
                "model      {}\ndata       {}: '{}', {} samples\n",
                model.display(),
                data.display(),
                ds.key,
                m.samples
            );
            if let Some(c) = m.correct {
                text += &format!(
                    "accuracy   {:.4} ({c}/{})\n",
                    c as f64 / m.samples as f64,
                    m.samples
                );
            }
            if let (Some(a), Some((r, _))) = (m.agree, &reference) {
                text += &format!(
                    "agreement  {:.4} ({a}/{}) top-1 with {}\n",
                    a as f64 / m.samples as f64,
                    m.samples,
                    r.display()
                );
            }
            if let Some(db) = m.sqnr_db {
                text += &format!("sqnr       {db:.2} dB\n");
            }
            emit(&text)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Train {
            model,
            data,
            key,
            labels,
            norm,
            teacher,
            eval,
            eval_limit,
            epochs,
            batch,
            lr,
            optimizer,
            momentum,
            weight_decay,
            pact_decay,
            schedule,
            bn_freeze,
            bn,
            quant_delay,
            temperature,
            range_ema,
            seed,
            threads,
            limit,
            checkpoint,
            resume,
            output,
        } => {
            let loaded = load(&model)?;
            let teacher_model = teacher.as_ref().map(|t| load(t)).transpose()?;
            let ds = qgraph::data::Dataset::load_npz(&data, key.as_deref(), labels.as_deref())?;
            let eval_ds = eval
                .as_ref()
                .map(|e| qgraph::data::Dataset::load_npz(e, key.as_deref(), labels.as_deref()))
                .transpose()?;
            let schedule = qgraph::trainer::Schedule::parse(&schedule)
                .map_err(|e| Failure(format!("--schedule: {e}")))?;
            if range_ema.is_some_and(|d| !(0.0..1.0).contains(&d)) {
                return Err(Failure("--range-ema: the weight must lie in [0, 1)".into()));
            }
            if lr.is_nan() || lr <= 0.0 {
                return Err(Failure(format!("--lr: {lr} is not a positive rate")));
            }
            let checkpoint = checkpoint.unwrap_or_else(|| {
                let stem = output.file_stem().unwrap_or_default().to_string_lossy();
                let ext = output.extension().map(|e| e.to_string_lossy().to_string());
                output.with_file_name(match ext {
                    Some(e) => format!("{stem}.ckpt.{e}"),
                    None => format!("{stem}.ckpt"),
                })
            });
            let config = qgraph::trainer::Config {
                batch,
                lr,
                optimizer: match optimizer {
                    OptimizerArg::Sgd => qgraph::trainer::Optimizer::Sgd { momentum },
                    OptimizerArg::Adam => qgraph::trainer::Optimizer::adam(),
                },
                weight_decay,
                pact_decay,
                schedule,
                seed,
                threads,
                bn_freeze_step: bn_freeze,
                quant_delay,
                temperature,
                range_decay: range_ema,
                fold_batch_norm: matches!(bn, BnArg::Fold),
                ..qgraph::trainer::Config::default()
            };
            let options = qgraph::train::TrainOptions {
                config,
                epochs,
                norm: norm.into(),
                limit,
                teacher: teacher_model.map(|t| t.model),
                eval: eval_ds,
                eval_limit,
                checkpoint: Some(checkpoint.clone()),
                resume,
            };
            let mut bar = indicatif::ProgressBar::hidden();
            let (trained, _) =
                qgraph::train::train(&loaded.model, &ds, options, &mut |p| match p {
                    qgraph::train::Progress::Epoch { epoch, steps } => {
                        bar = indicatif::ProgressBar::new(steps as u64).with_style(
                            indicatif::ProgressStyle::with_template(&format!(
                                "epoch {} {{bar:30}} {{pos}}/{{len}} {{msg}} eta {{eta}}",
                                epoch + 1
                            ))
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                        );
                    }
                    qgraph::train::Progress::Step(r, rate) => {
                        bar.inc(1);
                        bar.set_message(format!(
                            "loss {:.4} lr {:.2e} {:.0} samples/s",
                            r.loss, r.lr, rate
                        ));
                    }
                    qgraph::train::Progress::Evaluating => bar.set_message("evaluating"),
                    qgraph::train::Progress::Done(r) => {
                        bar.finish_and_clear();
                        let mut line = format!("epoch {}  loss {:.4}", r.epoch + 1, r.mean_loss);
                        if let Some(a) = r.train_accuracy {
                            line += &format!("  train accuracy {a:.4}");
                        }
                        if let Some(a) = r.eval_accuracy {
                            line += &format!("  eval accuracy {a:.4}");
                        }
                        if let Some(a) = r.eval_agreement {
                            line += &format!("  eval agreement {a:.4}");
                        }
                        line += &format!("  {:.0} samples/s\n", r.samples_per_second);
                        eprint!("{line}");
                    }
                })
                .map_err(|e| Failure(format!("{}: {e}", model.display())))?;
            qgraph::save(&trained, &output, &qgraph::SaveOptions::default())?;
            if checkpoint.exists() && checkpoint != output {
                let _ = std::fs::remove_file(&checkpoint);
            }
            emit(&format!("wrote {}\n", output.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            input,
            passes,
            output,
            dump_after,
            rewrite_limit,
            fixpoint,
            list,
        } => {
            if list {
                let mut text = String::new();
                for p in qgraph::passes::registry() {
                    text += &format!("{:<16} {}\n", p.name, p.summary);
                }
                for (alias, seq) in qgraph::passes::ALIASES {
                    text += &format!("{:<16} the same as {}\n", alias, seq.join(","));
                }
                emit(&text)?;
                return Ok(ExitCode::SUCCESS);
            }
            let (Some(input), Some(passes), Some(output)) = (input, passes, output) else {
                return Err(Failure("run needs a model, --passes and -o".into()));
            };
            let mut model = load(&input)?.model;
            let driver = qgraph::passes::Driver::from_pipeline(&passes)
                .map_err(|e| Failure(format!("--passes: {e}")))?
                .rewrite_limit(rewrite_limit)
                .fixpoint(fixpoint);
            if let Some(dir) = &dump_after {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Failure(format!("{}: {e}", dir.display())))?;
            }
            let before = model.graph.node_count();
            let mut step = 0;
            let mut dump_error = None;
            let report = driver
                .run_with(&mut model, |pass, m| {
                    step += 1;
                    let Some(dir) = &dump_after else { return };
                    let path = dir.join(format!("{step:02}-{pass}.qgt"));
                    let text = qgraph::text::print_model(m, &Default::default());
                    if let Err(e) = qgraph::onnx::write_atomic(&path, text.as_bytes()) {
                        dump_error.get_or_insert(format!("{}: {e}", path.display()));
                    }
                })
                .map_err(|e| Failure(format!("{}: {e}", input.display())))?;
            if let Some(e) = dump_error {
                return Err(Failure(e));
            }
            qgraph::save(&model, &output, &qgraph::SaveOptions::default())?;
            let changed: Vec<&str> = report
                .runs
                .iter()
                .filter(|(_, c)| *c)
                .map(|(p, _)| *p)
                .collect();
            eprintln!(
                "qgraph: {} nodes -> {}; {} rewrites; changed by: {}{}",
                before,
                model.graph.node_count(),
                report.rewrites,
                if changed.is_empty() {
                    "none".to_string()
                } else {
                    changed.join(", ")
                },
                if fixpoint > 1 && !report.converged {
                    format!(" (still changing after {} rounds)", report.rounds)
                } else {
                    String::new()
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Insert {
            model,
            output,
            scheme,
            placement,
            overrides,
            calib,
            preprocess,
            key,
            norm,
            calib_count,
            method,
            percentile,
            batch,
            low_bit_ends,
            no_prepare,
            keep_bn,
            no_bias_correction,
            rounding,
            pow2_scales,
        } => {
            let mut scheme = qgraph::quant::Scheme::parse(&scheme)
                .map_err(|e| Failure(format!("--scheme: {e}")))?;
            if pow2_scales {
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
            if !(0.0..=100.0).contains(&percentile) || percentile == 0.0 {
                return Err(Failure(format!(
                    "--percentile must be in (0, 100], not {percentile}"
                )));
            }
            let mut m = load(&model)?.model;
            let options = qgraph::passes::InsertOptions {
                scheme,
                placement: match placement {
                    PlacementArg::Tensorrt => qgraph::passes::Placement::TensorRt,
                    PlacementArg::Ort => qgraph::passes::Placement::Ort,
                },
                ends_at_8_bits: !low_bit_ends,
                overrides: match &overrides {
                    None => Vec::new(),
                    Some(path) => {
                        let text = std::fs::read_to_string(path)
                            .map_err(|e| Failure(format!("{}: {e}", path.display())))?;
                        qgraph::insert::parse_overrides(&text)
                            .map_err(|e| Failure(format!("{}: {e}", path.display())))?
                    }
                },
            };
            let mut norm = norm.into();
            let (prep, prep_norm) =
                qgraph::data::Preprocess::parse(preprocess.as_deref().unwrap_or(""))
                    .map_err(|e| Failure(format!("--preprocess: {e}")))?;
            if let Some(n) = prep_norm {
                norm = n;
            }
            let data = match &calib {
                Some(path) if path.is_dir() => {
                    Some(qgraph::data::Dataset::load_images(path, prep)?)
                }
                Some(path) => {
                    if preprocess.is_some() {
                        return Err(Failure(format!(
                            "--preprocess applies to a folder of images; {} is a file",
                            path.display()
                        )));
                    }
                    Some(qgraph::data::Dataset::load_npz(
                        path,
                        key.as_deref(),
                        Some(""),
                    )?)
                }
                None => None,
            };
            if let (Some(ds), Some(path)) = (&data, &calib) {
                ds.check_norm(norm)
                    .map_err(|e| Failure(format!("{}: {e}", path.display())))?;
            }
            let method = match method {
                MethodArg::Minmax => qgraph::insert::Method::MinMax,
                MethodArg::Percentile => qgraph::insert::Method::Percentile(percentile),
                MethodArg::Entropy => qgraph::insert::Method::Entropy,
                MethodArg::Mse => qgraph::insert::Method::Mse,
            };
            let calibration = data.as_ref().map(|ds| qgraph::insert::Calibration {
                data: ds,
                samples: qgraph::insert::spread_samples(
                    ds.len(),
                    calib_count.unwrap_or(usize::MAX),
                ),
                norm,
                batch,
                method,
                rounding: match rounding {
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
                match (no_prepare, keep_bn) {
                    (true, _) => qgraph::insert::Prepare::Skip,
                    (false, true) => qgraph::insert::Prepare::KeepBatchNorm,
                    (false, false) => qgraph::insert::Prepare::Deploy,
                },
                !no_bias_correction,
                calibration.as_ref(),
                |done| bar.set_position(done as u64),
            )
            .map_err(|e| Failure(format!("{}: {e}", model.display())))?;
            bar.finish_and_clear();
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
                    format!(
                        "; {} activations left float without a range (give --calib): {}",
                        r.unranged.len(),
                        r.unranged.join(", ")
                    )
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            float,
            quantized,
            data,
            key,
            norm,
            limit,
            batch,
            svg,
        } => {
            let (f, q) = (load(&float)?.model, load(&quantized)?.model);
            let ds = qgraph::data::Dataset::load_npz(&data, key.as_deref(), Some(""))?;
            let norm = norm.into();
            let samples = qgraph::insert::spread_samples(ds.len(), limit.max(1));
            let bar = sample_bar(samples.len(), "");
            let rows = qgraph::report::report(&f, &q, &ds, &samples, norm, batch, |done| {
                bar.set_position(done as u64)
            })
            .map_err(|e| Failure(format!("{}: {e}", quantized.display())))?;
            bar.finish_and_clear();
            if let Some(path) = &svg {
                let chart = qgraph::report::svg(&rows, &quantized.display().to_string());
                qgraph::onnx::write_atomic(path, chart.as_bytes())
                    .map_err(|e| Failure(format!("{}: {e}", path.display())))?;
            }
            emit(&qgraph::report::table(&rows))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Freeze {
            model,
            output,
            target,
            int4,
        } => {
            let mut m = load(&model)?.model;
            let target = match target {
                TargetArg::Tensorrt => qgraph::freeze::Target::TensorRt,
                TargetArg::Ort => qgraph::freeze::Target::Ort,
                TargetArg::Integer => qgraph::freeze::Target::Integer,
                TargetArg::IntegerOnnx => qgraph::freeze::Target::IntegerOnnx,
            };
            let int4 = match int4 {
                Int4Arg::Auto => qgraph::freeze::Int4::Auto,
                Int4Arg::Always => qgraph::freeze::Int4::Always,
                Int4Arg::Never => qgraph::freeze::Int4::Never,
            };
            let frozen = qgraph::freeze::freeze(&mut m, target, int4)
                .map_err(|e| Failure(format!("{}: {e}", model.display())))?;
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
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            reference,
            frozen,
            data,
            key,
            norm,
            limit,
            batch,
        } => {
            let (r, f) = (load(&reference)?.model, load(&frozen)?.model);
            let ds = qgraph::data::Dataset::load_npz(&data, key.as_deref(), Some(""))?;
            let norm = norm.into();
            let samples =
                qgraph::insert::spread_samples(ds.len(), limit.unwrap_or(usize::MAX).max(1));
            let bar = sample_bar(samples.len(), "");
            let found = qgraph::freeze::verify(&r, &f, &ds, &samples, norm, batch, |done| {
                bar.set_position(done as u64)
            })
            .map_err(|e| Failure(format!("{}: {e}", frozen.display())))?;
            bar.finish_and_clear();
            let mut text = format!(
                "{:<24} {:>10} {:>10} {:>12} {:>14} {:>8}\n",
                "output", "elements", "max LSB", "within 1 LSB", "max relative", "top-1"
            );
            let opt = |v: Option<f64>, digits: usize| {
                v.map_or("-".to_string(), |v| format!("{v:.digits$}"))
            };
            for row in &found.outputs {
                text.push_str(&format!(
                    "{:<24} {:>10} {:>10} {:>12} {:>14.3e} {:>8}\n",
                    row.name,
                    row.elements,
                    opt(row.max_lsb, 2),
                    row.within_one_lsb
                        .map_or("-".to_string(), |v| format!("{:.3}%", v * 100.0)),
                    row.max_relative,
                    opt(row.top1, 4)
                ));
            }
            let ops = &found.ops;
            if ops.tensors > 0 {
                let share = |k: usize| 100.0 * k as f64 / ops.elements.max(1) as f64;
                text.push_str(&format!(
                    "\nop by op (each op on the reference's own integer inputs): {} quantized tensors, \
                     {:.4}% of elements equal, {:.4}% within 1 LSB, largest difference {} LSB{}\n",
                    ops.tensors,
                    share(ops.equal),
                    share(ops.within_one),
                    ops.max_steps,
                    if ops.max_steps > 0 {
                        format!(" ('{}')", ops.worst)
                    } else {
                        String::new()
                    }
                ));
            }
            emit(&text)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert {
            input,
            output,
            external_data,
            all_data,
        } => {
            let loaded = load(&input)?;
            let external_data = match external_data {
                ExternalArg::Auto => qgraph::onnx::ExternalData::Auto,
                ExternalArg::Always => qgraph::onnx::ExternalData::Always,
                ExternalArg::Never => qgraph::onnx::ExternalData::Never,
            };
            let opts = qgraph::SaveOptions {
                external_data,
                all_data,
            };
            qgraph::save(&loaded.model, &output, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(Failure(message)) => {
            eprintln!("qgraph: error: {message}");
            ExitCode::from(2)
        }
    }
}
