//! `qgraph train`: epochs of quantization-aware (or float) training on a
//! data set, with labels or distilled from a teacher, evaluation after each
//! epoch, and checkpoints (every few steps, at each epoch's end and when
//! interrupted) from which a run resumes where it stopped.

use crate::data::{first_output_rows, spread_samples, Dataset, Norm};
use crate::{save, Error, SaveOptions};
use qgraph_eval::Evaluator;
use qgraph_ir::Model;
use qgraph_train::{Config, ExportForm, StepReport, Targets, Trainer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// Training settings beyond the trainer's own.
pub struct TrainOptions {
    /// The trainer's settings; `total_steps` is set here from the epochs.
    pub config: Config,
    pub epochs: usize,
    pub norm: Norm,
    /// Train on N samples spread evenly over the data set (default: all).
    pub limit: Option<usize>,
    /// Distil from this model's outputs instead of using labels.
    pub teacher: Option<Model>,
    /// Measured after each epoch: accuracy with labels, top-1 agreement
    /// with the teacher without.
    pub eval: Option<Dataset>,
    /// Evaluate on N samples spread evenly over the evaluation set.
    pub eval_limit: Option<usize>,
    /// Written atomically every `checkpoint_every` steps, after each epoch
    /// and when the run is interrupted.
    pub checkpoint: Option<PathBuf>,
    /// Steps between checkpoints within an epoch (`None`: epoch ends only).
    pub checkpoint_every: Option<usize>,
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

/// Where a resumed run starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resumed {
    pub checkpoint: PathBuf,
    /// Whole epochs done, and steps done into the next.
    pub epoch: usize,
    pub step_in_epoch: usize,
    pub steps_per_epoch: usize,
    /// The trainer's steps done in all (the schedule's position).
    pub steps_done: usize,
    /// Settings that differ from the checkpoint's run: `(name, then, now)`.
    pub changed: Vec<(String, String, String)>,
}

/// Progress of a run, for a progress bar.
pub enum Progress<'a> {
    Resumed(&'a Resumed),
    /// An epoch starts (at `first_step` when resumed inside it).
    Epoch {
        epoch: usize,
        steps: usize,
        first_step: usize,
    },
    Step(&'a StepReport, f64),
    Evaluating,
    Checkpoint(&'a std::path::Path),
    Done(&'a EpochReport),
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finish {
    /// Every epoch ran.
    Complete,
    /// `interrupt` was set: the run stopped after a step, at this place,
    /// and its checkpoint (when there is one) was written.
    Interrupted { epoch: usize, step_in_epoch: usize },
}

/// What `train` returns: the trained model (the original graph with new
/// values), a report per epoch run, and how the run ended.
pub struct Trained {
    pub model: Model,
    pub epochs: Vec<EpochReport>,
    pub finish: Finish,
    pub resumed: Option<Resumed>,
}

/// Metadata of checkpoints and trained models, from which `--resume`
/// continues: whole epochs done, steps done into the next, the trainer's
/// step, the input graph's fingerprint and the run's settings.
const EPOCH_KEY: &str = "qgraph.train.epochs_done";
const EPOCH_STEP_KEY: &str = "qgraph.train.epoch_steps_done";
const STEP_KEY: &str = "qgraph.train.steps_done";
const GRAPH_KEY: &str = "qgraph.train.graph";
const SETTINGS_KEY: &str = "qgraph.train.settings";

fn meta_number(model: &Model, key: &str) -> Option<usize> {
    crate::meta_value(model, key).and_then(|v| v.parse().ok())
}

/// A digest of a model's graph without its initializers' values: nodes
/// (ops, names, inputs, outputs, attributes), graph inputs and outputs with
/// their types, and initializers by name, type and shape. Training changes
/// values only, so a checkpoint's graph has the fingerprint of the model it
/// was trained from.
pub fn graph_fingerprint(model: &Model) -> String {
    let g = &model.graph;
    let mut h = blake3::Hasher::new();
    let opts = qgraph_text::PrintOptions::default();
    for v in g.inputs().iter().chain(g.outputs()) {
        let value = g.value(*v);
        h.update(value.name().as_bytes());
        h.update(format!("{:?}\n", value.ty).as_bytes());
    }
    for v in g.initializers() {
        let value = g.value(v);
        let t = &g.initializer(v).expect("an initializer").tensor;
        h.update(format!("{} {} {:?}\n", value.name(), t.dtype(), t.shape()).as_bytes());
    }
    for n in g.topo_order().unwrap_or_else(|_| g.node_ids()) {
        let node = g.node(n);
        // The node's line without tensors' digests: a Constant's value is a
        // value, which training may change.
        let mut line = qgraph_text::format_node(g, n, &opts);
        if let Some(i) = line.find("<blake3:") {
            line.truncate(i);
        }
        h.update(node.op_type.as_bytes());
        h.update(line.as_bytes());
        h.update(b"\n");
    }
    h.finalize().to_hex()[..16].to_string()
}

/// The settings a resumed run should share with the checkpoint's, as
/// `(flag, value)`.
fn settings(options: &TrainOptions) -> Vec<(String, String)> {
    let c = &options.config;
    let mut s = vec![
        ("--batch", c.batch.to_string()),
        ("--lr", c.lr.to_string()),
        ("--optimizer", format!("{:?}", c.optimizer)),
        ("--weight-decay", c.weight_decay.to_string()),
        ("--pact-decay", c.pact_decay.to_string()),
        ("--schedule", format!("{:?}", c.schedule)),
        ("--seed", c.seed.to_string()),
        ("--bn-freeze", format!("{:?}", c.bn_freeze_step)),
        ("--quant-delay", c.quant_delay.to_string()),
        ("--range-ema", format!("{:?}", c.range_decay)),
        ("--temperature", c.temperature.to_string()),
        (
            "--bn",
            if c.fold_batch_norm {
                "fold"
            } else {
                "separate"
            }
            .to_string(),
        ),
        ("--epochs", options.epochs.to_string()),
        ("--limit", format!("{:?}", options.limit)),
        ("--norm", options.norm.name().to_string()),
        ("--teacher", options.teacher.is_some().to_string()),
    ];
    s.sort();
    s.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn settings_text(settings: &[(String, String)]) -> String {
    settings
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}

/// Where the run stands, for the metadata of what it writes.
struct Place<'a> {
    epochs_done: usize,
    epoch_steps_done: usize,
    fingerprint: &'a str,
    settings: &'a str,
}

/// The trained model in `form`, with where the run stands recorded.
fn export(
    trainer: &Trainer,
    original: &Model,
    form: ExportForm,
    place: &Place,
    norm: Norm,
) -> Result<Model, String> {
    let mut m = trainer.export(original, form).map_err(|e| e.to_string())?;
    for (k, v) in [
        (EPOCH_KEY, place.epochs_done.to_string()),
        (EPOCH_STEP_KEY, place.epoch_steps_done.to_string()),
        (STEP_KEY, trainer.steps_done().to_string()),
        (GRAPH_KEY, place.fingerprint.to_string()),
        (SETTINGS_KEY, place.settings.to_string()),
    ] {
        crate::set_meta_value(&mut m, k, v);
    }
    crate::data::record_norm(&mut m, norm);
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

/// Steps in an epoch of `count` samples in batches of `batch`: a last batch
/// of one sample is dropped, since batch statistics need two.
pub fn steps_per_epoch(count: usize, batch: usize) -> usize {
    let batch = batch.max(1);
    if count % batch == 1 {
        count / batch
    } else {
        count.div_ceil(batch)
    }
}

/// Reads the checkpoint to resume from: it must come from the same graph;
/// settings that changed are reported, not refused.
fn resume_from(
    path: &std::path::Path,
    fingerprint: &str,
    settings: &[(String, String)],
    steps_per_epoch: usize,
) -> Result<(Model, Resumed), Error> {
    let loaded = crate::load(path)?.model;
    match crate::meta_value(&loaded, GRAPH_KEY) {
        Some(f) if f == fingerprint => {}
        Some(_) => {
            return Err(Error::new(
                path,
                "is a checkpoint of another model (its graph differs from the model given); \
                 give that model, or another --checkpoint",
            ))
        }
        None => {
            return Err(Error::new(
                path,
                "is not a checkpoint of `qgraph train` (it records no training graph)",
            ))
        }
    }
    let then: Vec<(String, String)> = crate::meta_value(&loaded, SETTINGS_KEY)
        .unwrap_or_default()
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let changed = settings
        .iter()
        .filter_map(|(k, now)| {
            let old = then.iter().find(|(tk, _)| tk == k)?;
            (&old.1 != now).then(|| (k.clone(), old.1.clone(), now.clone()))
        })
        .collect();
    let resumed = Resumed {
        checkpoint: path.to_path_buf(),
        epoch: meta_number(&loaded, EPOCH_KEY).unwrap_or(0),
        step_in_epoch: meta_number(&loaded, EPOCH_STEP_KEY)
            .unwrap_or(0)
            .min(steps_per_epoch),
        steps_per_epoch,
        steps_done: meta_number(&loaded, STEP_KEY).unwrap_or(0),
        changed,
    };
    Ok((loaded, resumed))
}

/// Trains `model` on `data`. Between steps it looks at `interrupt`: once
/// set, it writes the checkpoint and returns what it has, as
/// [`Finish::Interrupted`].
pub fn train(
    model: &Model,
    data: &Dataset,
    options: TrainOptions,
    interrupt: Option<&AtomicBool>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Trained, Error> {
    data.check_norm(options.norm)?;
    let pool = spread_samples(data.len(), options.limit.unwrap_or(usize::MAX));
    let count = pool.len();
    let batch = options.config.batch.max(1);
    let steps_per_epoch = steps_per_epoch(count, batch);
    if steps_per_epoch == 0 {
        return Err(format!("{count} samples make no batch of {batch}").into());
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
    let fingerprint = graph_fingerprint(model);
    let settings = settings(&options);
    let settings_line = settings_text(&settings);
    // Resuming: the checkpoint's values, epoch and step.
    let mut checkpointed = None;
    let mut resumed = None;
    if let (true, Some(path)) = (options.resume, &options.checkpoint) {
        if path.exists() {
            let (loaded, r) = resume_from(path, &fingerprint, &settings, steps_per_epoch)?;
            progress(Progress::Resumed(&r));
            checkpointed = Some(loaded);
            resumed = Some(r);
        }
    }
    // A model that was trained before (and so records a step) starts a new
    // run at step 0 unless it resumes.
    let (first_epoch, mut skip_steps, first_step) = resumed
        .as_ref()
        .map_or((0, 0, 0), |r| (r.epoch, r.step_in_epoch, r.steps_done));
    let start_model = checkpointed.as_ref().unwrap_or(model);
    let mut trainer = Trainer::new(start_model, config.clone()).map_err(|e| e.to_string())?;
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
    let place = |epochs_done, epoch_steps_done| Place {
        epochs_done,
        epoch_steps_done,
        fingerprint: &fingerprint,
        settings: &settings_line,
    };
    let write_checkpoint =
        |trainer: &Trainer, at: &Place, progress: &mut dyn FnMut(Progress)| -> Result<(), Error> {
            if let Some(path) = &options.checkpoint {
                let checkpoint = export(trainer, model, ExportForm::Checkpoint, at, options.norm)?;
                save(&checkpoint, path, &SaveOptions::default())?;
                progress(Progress::Checkpoint(path));
            }
            Ok(())
        };
    let interrupted = || interrupt.is_some_and(|f| f.load(Ordering::Relaxed));
    let mut reports = Vec::new();
    // A resumed run with every epoch done gives the checkpoint's values,
    // in the deployable form.
    let mut current = export(
        &trainer,
        model,
        ExportForm::Deploy,
        &place(first_epoch, 0),
        options.norm,
    )?;
    for epoch in first_epoch..options.epochs {
        let first = std::mem::take(&mut skip_steps);
        progress(Progress::Epoch {
            epoch,
            steps: steps_per_epoch,
            first_step: first,
        });
        let order: Vec<usize> = shuffled(count, config.seed.wrapping_add(epoch as u64))
            .into_iter()
            .map(|i| pool[i])
            .collect();
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
            for s in first..steps_per_epoch {
                if interrupted() {
                    // The trained values live in the trainer's copy of the
                    // graph, not in the evaluators: export them as they are.
                    write_checkpoint(&trainer, &place(epoch, s), progress)?;
                    let model = export(
                        &trainer,
                        model,
                        ExportForm::Deploy,
                        &place(epoch, s),
                        options.norm,
                    )?;
                    return Ok(Trained {
                        model,
                        epochs: reports,
                        finish: Finish::Interrupted {
                            epoch,
                            step_in_epoch: s,
                        },
                        resumed,
                    });
                }
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
                let done = s + 1;
                if options
                    .checkpoint_every
                    .is_some_and(|every| done % every.max(1) == 0 && done < steps_per_epoch)
                {
                    write_checkpoint(&trainer, &place(epoch, done), progress)?;
                }
            }
        }
        let samples_per_second = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
        current = export(
            &trainer,
            model,
            ExportForm::Deploy,
            &place(epoch + 1, 0),
            options.norm,
        )?;
        let (mut eval_accuracy, mut eval_agreement) = (None, None);
        if let Some(eval) = &options.eval {
            progress(Progress::Evaluating);
            let indices = spread_samples(eval.len(), options.eval_limit.unwrap_or(usize::MAX));
            let m = crate::data::measure(
                &current,
                options.teacher.as_ref(),
                eval,
                options.norm,
                64,
                &indices,
                |_| {},
            )?;
            eval_accuracy = m.correct.map(|c| c as f64 / m.samples.max(1) as f64);
            eval_agreement = m.agree.map(|a| a as f64 / m.samples.max(1) as f64);
        }
        write_checkpoint(&trainer, &place(epoch + 1, 0), progress)?;
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
    Ok(Trained {
        model: current,
        epochs: reports,
        finish: Finish::Complete,
        resumed,
    })
}
