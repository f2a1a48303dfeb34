//! `qgraph train`: quantization-aware training, checkpointed and resumable.

use crate::common::{
    check_fits, check_writable, default_output, load, load_data, positive, round_rate, BatchArgs,
    DataArgs, Failure, LimitArgs, NormArgs, Outcome,
};
use clap::ValueEnum;
use qgraph::train::{Finish, Progress};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

/// Quantization-aware training of a Q/DQ model (or training of a float
/// one), with labels or distilled from a teacher model.
#[derive(clap::Args)]
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
                  'qgraph freeze'.\n\n\
                  A checkpoint is written every --checkpoint-every steps, at the end of each \
                  epoch and on Ctrl-C (a second Ctrl-C stops at once); the same command with \
                  --resume continues from it, at the step where it stopped. A checkpoint of \
                  another model is refused; settings that changed are named. Optimizer state \
                  (momentum, Adam's moments) starts afresh on resuming.\n\n\
                  Examples:\n  qgraph train cnn.onnx --data train.npz --eval test.npz --epochs 5 --lr 0.05\n  \
                  qgraph train qdq.onnx --data photos.npz --key x_u8 --teacher float.onnx \\\n      \
                  --optimizer adam --lr 1e-5 --schedule sine --epochs 2 -o qat.onnx"
)]
pub struct Args {
    /// The model to train (.onnx or .qgt): Q/DQ or float.
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// The array of labels (default: y when present).
    #[arg(long)]
    labels: Option<String>,
    #[command(flatten)]
    norm: NormArgs,
    /// Distil from this model (usually the float one) instead of labels.
    #[arg(long, value_name = "MODEL")]
    teacher: Option<PathBuf>,
    /// Evaluation data, measured after each epoch (same key and labels).
    #[arg(long, value_name = "FILE")]
    eval: Option<PathBuf>,
    /// Evaluate on N samples spread evenly over the evaluation data.
    #[arg(long, value_name = "N", value_parser = positive)]
    eval_limit: Option<usize>,
    /// Passes over the training data.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = positive)]
    epochs: usize,
    #[command(flatten)]
    batch: BatchArgs,
    #[command(flatten)]
    limit: LimitArgs,
    /// Base learning rate.
    #[arg(long, default_value_t = 0.01, allow_negative_numbers = true)]
    lr: f32,
    /// How weights move.
    #[arg(long, value_enum, default_value_t = OptimizerArg::Sgd)]
    optimizer: OptimizerArg,
    /// SGD momentum, in [0, 1).
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    momentum: f32,
    /// L2 decay on weights (decoupled for Adam).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    weight_decay: f32,
    /// PACT's L2 decay on its clipping levels.
    #[arg(long, default_value_t = 2e-4, allow_negative_numbers = true)]
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
    #[arg(long, value_name = "STEPS", default_value_t = 0)]
    quant_delay: usize,
    /// Distillation temperature.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Online activation ranges for schemes that do not learn them: a
    /// moving average of the batches' extremes with this weight on the
    /// old range (e.g. 0.99). Default: the calibrated ranges stay.
    #[arg(long, allow_negative_numbers = true)]
    range_ema: Option<f32>,
    /// Seed of the sample order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Checkpoint file [default: the output with .ckpt before its extension].
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    /// Steps between checkpoints within an epoch (one is also written at
    /// each epoch's end and on Ctrl-C).
    #[arg(long, value_name = "STEPS", default_value_t = 100, value_parser = positive)]
    checkpoint_every: usize,
    /// Continue from the checkpoint when it exists.
    #[arg(long)]
    resume: bool,
    /// Where to write the trained model, atomically
    /// [default: <model>.trained.onnx beside the model].
    #[arg(short, long)]
    output: Option<PathBuf>,
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

/// Set by the first Ctrl-C: training stops after the step it is in.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Checks the numeric settings, before any file is read.
fn check_settings(args: &Args) -> Result<(), Failure> {
    let checks: [(bool, String); 6] = [
        (
            args.lr.is_finite() && args.lr > 0.0,
            format!("--lr: {} is not a positive rate", args.lr),
        ),
        (
            (0.0..1.0).contains(&args.momentum),
            format!("--momentum: {} is not in [0, 1)", args.momentum),
        ),
        (
            args.weight_decay.is_finite() && args.weight_decay >= 0.0,
            format!("--weight-decay: {} is negative", args.weight_decay),
        ),
        (
            args.pact_decay.is_finite() && args.pact_decay >= 0.0,
            format!("--pact-decay: {} is negative", args.pact_decay),
        ),
        (
            args.temperature.is_finite() && args.temperature > 0.0,
            format!("--temperature: {} is not positive", args.temperature),
        ),
        (
            args.range_ema.is_none_or(|d| (0.0..1.0).contains(&d)),
            "--range-ema: the weight must lie in [0, 1)".to_string(),
        ),
    ];
    match checks.into_iter().find(|(ok, _)| !ok) {
        Some((_, why)) => Err(Failure(why)),
        None => Ok(()),
    }
}

/// `<output's stem>.ckpt.<extension>` beside the output.
fn default_checkpoint(output: &Path) -> PathBuf {
    let stem = output.file_stem().unwrap_or_default().to_string_lossy();
    output.with_file_name(match output.extension() {
        Some(e) => format!("{stem}.ckpt.{}", e.to_string_lossy()),
        None => format!("{stem}.ckpt"),
    })
}

pub fn run(args: Args) -> Outcome {
    check_settings(&args)?;
    let schedule = qgraph::trainer::Schedule::parse(&args.schedule)
        .map_err(|e| Failure(format!("--schedule: {e}")))?;
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(&args.model, "trained"));
    let checkpoint = args
        .checkpoint
        .clone()
        .unwrap_or_else(|| default_checkpoint(&output));
    check_writable(&output)?;
    check_writable(&checkpoint)?;
    let loaded = load(&args.model)?;
    let teacher = args.teacher.as_ref().map(|t| load(t)).transpose()?;
    let ds = load_data(
        &args.data,
        args.labels.as_deref(),
        (&args.model, &loaded.model),
    )?;
    let eval_ds = args
        .eval
        .as_ref()
        .map(|e| -> Result<_, Failure> {
            let ds = qgraph::data::Dataset::load_npz(
                e,
                args.data.key.as_deref(),
                args.labels.as_deref(),
            )?;
            check_fits(&ds, e, (&args.model, &loaded.model))?;
            Ok(ds)
        })
        .transpose()?;
    let mut recorded = vec![(args.model.as_path(), &loaded.model)];
    if let (Some(path), Some(t)) = (&args.teacher, &teacher) {
        recorded.push((path.as_path(), &t.model));
    }
    let norm = args.norm.resolve(&recorded)?;
    let config = qgraph::trainer::Config {
        batch: args.batch.batch,
        lr: args.lr,
        optimizer: match args.optimizer {
            OptimizerArg::Sgd => qgraph::trainer::Optimizer::Sgd {
                momentum: args.momentum,
            },
            OptimizerArg::Adam => qgraph::trainer::Optimizer::adam(),
        },
        weight_decay: args.weight_decay,
        pact_decay: args.pact_decay,
        schedule,
        seed: args.seed,
        threads: args.threads,
        bn_freeze_step: args.bn_freeze,
        quant_delay: args.quant_delay,
        temperature: args.temperature,
        range_decay: args.range_ema,
        fold_batch_norm: matches!(args.bn, BnArg::Fold),
        ..qgraph::trainer::Config::default()
    };
    let options = qgraph::train::TrainOptions {
        config,
        epochs: args.epochs,
        norm,
        limit: args.limit.limit,
        teacher: teacher.map(|t| t.model),
        eval: eval_ds,
        eval_limit: args.eval_limit,
        checkpoint: Some(checkpoint.clone()),
        checkpoint_every: Some(args.checkpoint_every),
        resume: args.resume,
    };
    // The first Ctrl-C asks for a checkpoint and a clean stop; a second one
    // stops at once.
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    let epochs = args.epochs;
    let mut bar = indicatif::ProgressBar::hidden();
    let trained =
        qgraph::train::train(
            &loaded.model,
            &ds,
            options,
            Some(&INTERRUPTED),
            &mut |p| match p {
                Progress::Resumed(r) => {
                    eprintln!(
                        "qgraph: resuming from {}: epoch {} of {epochs}, step {} of {}",
                        r.checkpoint.display(),
                        r.epoch + 1,
                        r.step_in_epoch,
                        r.steps_per_epoch
                    );
                    if !r.changed.is_empty() {
                        let changes: Vec<String> = r
                            .changed
                            .iter()
                            .map(|(k, then, now)| format!("{k} {then} -> {now}"))
                            .collect();
                        eprintln!(
                            "qgraph: warning: settings changed since the checkpoint: {}",
                            changes.join(", ")
                        );
                    }
                }
                Progress::Epoch {
                    epoch,
                    steps,
                    first_step,
                } => {
                    bar = indicatif::ProgressBar::new(steps as u64).with_style(
                        indicatif::ProgressStyle::with_template(&format!(
                        "epoch {}/{epochs} {{bar:30}} {{pos}}/{{len}} steps  {{msg}}  eta {{eta}}",
                        epoch + 1
                    ))
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    bar.set_position(first_step as u64);
                    bar.reset_eta();
                }
                Progress::Step(r, rate) => {
                    bar.inc(1);
                    bar.set_message(format!(
                        "loss {:.4}  lr {:.2e}  {} samples/s",
                        r.loss,
                        r.lr,
                        round_rate(rate)
                    ));
                }
                Progress::Evaluating => bar.set_message("evaluating"),
                Progress::Checkpoint(_) => {}
                Progress::Done(r) => {
                    bar.finish_and_clear();
                    let mut line =
                        format!("epoch {}/{epochs}  loss {:.4}", r.epoch + 1, r.mean_loss);
                    if let Some(a) = r.train_accuracy {
                        line += &format!("  train accuracy {a:.4}");
                    }
                    if let Some(a) = r.eval_accuracy {
                        line += &format!("  eval accuracy {a:.4}");
                    }
                    if let Some(a) = r.eval_agreement {
                        line += &format!("  eval agreement {a:.4}");
                    }
                    line += &format!("  {} samples/s\n", round_rate(r.samples_per_second));
                    eprint!("{line}");
                }
            },
        )
        .map_err(|e| e.in_file(&args.model))?;
    bar.finish_and_clear();
    if let Finish::Interrupted {
        epoch,
        step_in_epoch,
    } = trained.finish
    {
        eprintln!(
            "qgraph: interrupted in epoch {} of {epochs}, after step {step_in_epoch}; \
             checkpoint written to {}; the same command with --resume continues from there",
            epoch + 1,
            checkpoint.display()
        );
        return Ok(ExitCode::from(130));
    }
    qgraph::save(&trained.model, &output, &qgraph::SaveOptions::default())?;
    if checkpoint.exists() && checkpoint != output {
        let _ = std::fs::remove_file(&checkpoint);
    }
    eprintln!("qgraph: wrote {}", output.display());
    Ok(ExitCode::SUCCESS)
}
