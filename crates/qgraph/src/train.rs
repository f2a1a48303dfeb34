//! `qgraph train`: epochs of quantization-aware (or float) training on a
//! data set, with labels or distilled from a teacher, evaluation after each
//! epoch, and checkpoints from which an interrupted run resumes.

use crate::data::{first_output_rows, Dataset, Norm};
use crate::{save, SaveOptions};
use qgraph_eval::Evaluator;
use qgraph_ir::Model;
use qgraph_train::{Config, ExportForm, StepReport, Targets, Trainer};
use std::path::PathBuf;

/// Training settings beyond the trainer's own.
pub struct TrainOptions {
    /// The trainer's settings; `total_steps` is set here from the epochs.
    pub config: Config,
    pub epochs: usize,
    pub norm: Norm,
    /// Train on the first N samples only.
    pub limit: Option<usize>,
    /// Distil from this model's outputs instead of using labels.
    pub teacher: Option<Model>,
    /// Measured after each epoch: accuracy with labels, top-1 agreement
    /// with the teacher without.
    pub eval: Option<Dataset>,
    pub eval_limit: Option<usize>,
    /// Written atomically after each epoch.
    pub checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint, when it exists.
    pub resume: bool,
}

/// What one epoch gave.
#[derive(Clone, Debug)]
pub struct EpochReport {
    pub epoch: usize,
    pub mean_loss: f64,
    /// Training accuracy over the epoch's batches, with labels.
    pub train_accuracy: Option<f64>,
    /// Accuracy (labels) or agreement with the teacher on the evaluation
    /// set.
    pub eval_accuracy: Option<f64>,
    pub eval_agreement: Option<f64>,
    pub samples_per_second: f64,
}

/// Progress of a run, for a progress bar.
pub enum Progress<'a> {
    Epoch { epoch: usize, steps: usize },
    Step(&'a StepReport, f64),
    Evaluating,
    Done(&'a EpochReport),
}

/// Metadata of checkpoints and trained models: the epochs done and the
/// trainer's step, from which `--resume` continues.
const EPOCH_KEY: &str = "qgraph.train.epochs_done";
const STEP_KEY: &str = "qgraph.train.steps_done";

fn meta_number(model: &Model, key: &str) -> Option<usize> {
    model
        .meta
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// The trained model in `form`, with the epochs and steps done recorded.
fn export(
    trainer: &Trainer,
    original: &Model,
    form: ExportForm,
    epochs_done: usize,
) -> Result<Model, String> {
    let mut m = trainer.export(original, form).map_err(|e| e.to_string())?;
    m.meta.retain(|(k, _)| k != EPOCH_KEY && k != STEP_KEY);
    m.meta.push((EPOCH_KEY.into(), epochs_done.to_string()));
    m.meta
        .push((STEP_KEY.into(), trainer.steps_done().to_string()));
    Ok(m)
}

/// A deterministic shuffle of `0..n` (Fisher–Yates on SplitMix64).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Trains `model` on `data` and returns the trained model (the original
/// graph with new values) and a report per epoch run.
pub fn train(
    model: &Model,
    data: &Dataset,
    options: TrainOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Model, Vec<EpochReport>), String> {
    data.check_norm(options.norm)?;
    let count = options.limit.unwrap_or(usize::MAX).min(data.len());
    let batch = options.config.batch.max(1);
    // A last batch of one sample is dropped: batch statistics need two.
    let steps_per_epoch = if count % batch == 1 {
        count / batch
    } else {
        count.div_ceil(batch)
    };
    if steps_per_epoch == 0 {
        return Err(format!("{count} samples make no batch of {batch}"));
    }
    let labels = match (&options.teacher, &data.labels) {
        (None, None) => {
            return Err(
                "the data set has no labels: give labels or a teacher to distil from".into(),
            )
        }
        (None, Some(l)) => Some(l.as_slice()),
        (Some(_), _) => None,
    };
    let mut config = options.config.clone();
    config.total_steps = steps_per_epoch * options.epochs;
    // Resuming: the checkpoint's values, epochs and step.
    let mut start_model = model.clone();
    let mut first_epoch = 0;
    let mut first_step = 0;
    if let (true, Some(path)) = (options.resume, &options.checkpoint) {
        if path.exists() {
            let loaded = crate::load(path).map_err(|e| e.to_string())?;
            first_epoch = meta_number(&loaded.model, EPOCH_KEY).unwrap_or(0);
            first_step = meta_number(&loaded.model, STEP_KEY).unwrap_or(0);
            start_model = loaded.model;
        }
    }
    let mut trainer = Trainer::new(&start_model, config.clone()).map_err(|e| e.to_string())?;
    trainer.set_steps_done(first_step);
    let teacher = options
        .teacher
        .as_ref()
        .map(|t| {
            Evaluator::with_options(
                t,
                qgraph_eval::Options {
                    threads: config.threads,
                    whole_batches: false,
                },
            )
        })
        .transpose()
        .map_err(|e| format!("teacher: {e}"))?;
    let mut reports = Vec::new();
    // A resumed run with every epoch done gives the checkpoint's values,
    // in the deployable form.
    let mut current = export(&trainer, model, ExportForm::Deploy, first_epoch)?;
    for epoch in first_epoch..options.epochs {
        progress(Progress::Epoch {
            epoch,
            steps: steps_per_epoch,
        });
        let order = shuffled(count, config.seed.wrapping_add(epoch as u64));
        let started = std::time::Instant::now();
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0usize, 0usize);
        {
            let (quantized_model, float_model) = trainer.models();
            let ev_options = trainer.evaluator_options();
            let quantized =
                Evaluator::with_options(&quantized_model, ev_options).map_err(|e| e.to_string())?;
            let float = float_model
                .as_ref()
                .map(|m| Evaluator::with_options(m, ev_options))
                .transpose()
                .map_err(|e| e.to_string())?;
            for s in 0..steps_per_epoch {
                let idx = &order[s * batch..((s + 1) * batch).min(count)];
                let x = data.select(idx, options.norm)?;
                let batch_labels: Vec<i64>;
                let teacher_logits: Vec<f32>;
                let targets = match (&teacher, labels) {
                    (Some(t), _) => {
                        let out = t
                            .run(vec![x.clone()])
                            .map_err(|e| format!("teacher: {e}"))?;
                        teacher_logits = out
                            .first()
                            .and_then(first_output_rows)
                            .ok_or("teacher: the first output is not f32")?
                            .1;
                        Targets::Teacher(&teacher_logits)
                    }
                    (None, Some(l)) => {
                        batch_labels = idx.iter().map(|&i| l[i]).collect();
                        Targets::Labels(&batch_labels)
                    }
                    (None, None) => unreachable!("checked above"),
                };
                let report = trainer
                    .step(&quantized, float.as_ref(), x, targets)
                    .map_err(|e| e.to_string())?;
                loss_sum += report.loss * report.samples as f64;
                seen += report.samples;
                correct += report.correct.unwrap_or(0);
                let rate = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
                progress(Progress::Step(&report, rate));
            }
        }
        let samples_per_second = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
        current = export(&trainer, model, ExportForm::Deploy, epoch + 1)?;
        let (mut eval_accuracy, mut eval_agreement) = (None, None);
        if let Some(eval) = &options.eval {
            progress(Progress::Evaluating);
            let m = crate::data::measure(
                &current,
                options.teacher.as_ref(),
                eval,
                options.norm,
                64,
                options.eval_limit,
                |_| {},
            )?;
            eval_accuracy = m.correct.map(|c| c as f64 / m.samples.max(1) as f64);
            eval_agreement = m.agree.map(|a| a as f64 / m.samples.max(1) as f64);
        }
        if let Some(path) = &options.checkpoint {
            let checkpoint = export(&trainer, model, ExportForm::Checkpoint, epoch + 1)?;
            save(&checkpoint, path, &SaveOptions::default()).map_err(|e| e.to_string())?;
        }
        let report = EpochReport {
            epoch,
            mean_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: labels.map(|_| correct as f64 / seen.max(1) as f64),
            eval_accuracy,
            eval_agreement,
            samples_per_second,
        };
        progress(Progress::Done(&report));
        reports.push(report);
    }
    if std::env::var_os("QGRAPH_PROFILE").is_some() {
        eprintln!("{:<32} {:>8} {:>10}", "operator", "calls", "seconds");
        for (name, calls, secs) in trainer.profile() {
            eprintln!("{name:<32} {calls:>8} {secs:>10.3}");
        }
    }
    Ok((current, reports))
}
