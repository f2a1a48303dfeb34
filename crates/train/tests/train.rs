//! The trainer: its training graph computes what the Q/DQ graph computes,
//! exporting writes the trained values back by name (the Clip bounds of
//! narrow grids following their scales), training fits a small problem
//! under every scale rule, and two runs with one seed agree to the bit.

use qgraph_eval::grad::Mode;
use qgraph_eval::Evaluator;
use qgraph_ir::ndarray::{ArrayD, IxDyn};
use qgraph_ir::{Model, Tensor};
use qgraph_train::graph::ParamKind;
use qgraph_train::{
    Config, ExportForm, Optimizer, PrepareOptions, ScaleRule, Targets, Trainer, TrainingGraph,
};
use std::collections::HashMap;

/// The encoder block's attention, feed-forward and pooling nodes, shared with
/// the other crate's test of the same block.
const ENCODER_BLOCK_NODES: &str = include_str!("../../../testdata/encoder_block_nodes.txt");

fn values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn list(v: &[f32]) -> String {
    v.iter()
        .map(|x| format!("{x:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A small classifier on 2x6x6 images, as `qgraph insert` would quantize
/// it with `scheme`: per-channel 4-bit weights (grid metadata), a 4-bit
/// activation behind its Clip, an 8-bit input and an 8-bit last layer.
fn qdq_model(scheme: &str) -> String {
    let w = values(4 * 2 * 9, 1);
    let amax: Vec<f32> = w
        .chunks(18)
        .map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();
    let scales: Vec<f32> = amax.iter().map(|a| a / 7.0).collect();
    let fc = values(3 * 4, 2);
    let fc_scale = fc.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
    format!(
        r#"ir_version 8
opset "" 13
meta "qgraph.scheme" = "{scheme}"

graph main {{
  input %x: f32[N,2,6,6]
  output %y: f32[N,3]
  init %w = f32[4,2,3,3] [{w}]
  init %b = f32[4] [0.1, -0.1, 0.05, 0.0]
  init %g = f32[4] [1.0, 0.9, 1.1, 1.0]
  init %beta = f32[4] [0.0, 0.1, -0.1, 0.2]
  init %mean = f32[4] [0.0, 0.0, 0.0, 0.0]
  init %var = f32[4] [1.0, 1.0, 1.0, 1.0]
  init %fc = f32[3,4] [{fc}]
  init %fb = f32[3] [0.0, 0.0, 0.0]
  init %xs = f32[] [0.01]
  init %xz = i8[] [0]
  init %ws = f32[4] [{ws}]
  init %wz = i8[4] [0, 0, 0, 0]
  init %as = f32[] [0.2]
  init %az = u8[] [0]
  init %alo = f32[] [0.0]
  init %ahi = f32[] [3.0]
  init %fs = f32[] [{fs:?}]
  init %fz = i8[] [0]
  xq: %xq = QuantizeLinear(%x, %xs, %xz)
  xdq: %xd = DequantizeLinear(%xq, %xs, %xz)
  wq: %wq = QuantizeLinear(%w, %ws, %wz) {{axis = 0}}
    meta "qgraph.grid" = "-7,7"
  wdq: %wd = DequantizeLinear(%wq, %ws, %wz) {{axis = 0}}
  conv: %c = Conv(%xd, %wd, %b) {{pads = [1, 1, 1, 1]}}
  bn: %n = BatchNormalization(%c, %g, %beta, %mean, %var)
  relu: %r = Relu(%n)
  pool: %p = GlobalAveragePool(%r)
  flat: %f = Flatten(%p)
  clip: %fc_in = Clip(%f, %alo, %ahi)
  aq: %aq = QuantizeLinear(%fc_in, %as, %az)
    meta "qgraph.grid" = "0,15"
  adq: %ad = DequantizeLinear(%aq, %as, %az)
  fq: %fq = QuantizeLinear(%fc, %fs, %fz)
  fdq: %fd = DequantizeLinear(%fq, %fs, %fz)
  gemm: %y = Gemm(%ad, %fd, %fb) {{transB = 1}}
}}
"#,
        w = list(&w),
        fc = list(&fc),
        ws = list(&scales),
        fs = fc_scale,
    )
}

/// Noisy images of three classes: channel 0 bright, channel 1 bright, or
/// both dark (within the input quantizer's range, +-1.27).
fn data(count: usize, seed: u64) -> (Tensor, Vec<i64>) {
    let mut x = values(count * 72, seed);
    let mut labels = Vec::with_capacity(count);
    for (i, image) in x.chunks_mut(72).enumerate() {
        let class = i % 3;
        for (p, v) in image.iter_mut().enumerate() {
            let channel = p / 36;
            let offset = match (class, channel) {
                (0, 0) | (1, 1) => 0.6,
                (2, _) => -0.4,
                _ => 0.0,
            };
            *v = 0.5 * *v + offset;
        }
        labels.push(class as i64);
    }
    (
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[count, 2, 6, 6]), x).unwrap()),
        labels,
    )
}

/// The text form with every tensor's values.
fn print_all(m: &Model) -> String {
    qgraph_text::print_model(m, &qgraph_text::PrintOptions::with_all_data())
}

fn bits(t: &Tensor) -> Vec<u32> {
    match t {
        Tensor::F32(a) => a.iter().map(|v| v.to_bits()).collect(),
        t => panic!("{}", t.dtype()),
    }
}

#[test]
fn the_training_graph_computes_what_the_q_dq_graph_computes() {
    let model: Model = qgraph_text::parse_model(&qdq_model("w4a4")).unwrap();
    // The batch normalization kept separate (folding changes what the
    // weight quantizer sees; see the test below).
    let tg = TrainingGraph::prepare_with(
        &model,
        PrepareOptions {
            fold_batch_norm: false,
        },
    )
    .unwrap();
    // Three pairs became FakeQuantize nodes and the Clip went with its pair.
    let ops: Vec<String> = tg
        .model
        .graph
        .topo_order()
        .unwrap()
        .into_iter()
        .map(|n| tg.model.graph.node(n).op_type.clone())
        .collect();
    assert_eq!(ops.iter().filter(|o| *o == "FakeQuantize").count(), 4);
    assert!(
        !ops.iter().any(|o| o == "QuantizeLinear" || o == "Clip"),
        "{ops:?}"
    );
    let grids: Vec<(i64, i64)> = tg.quantizers.iter().map(|q| (q.qmin, q.qmax)).collect();
    assert_eq!(grids, vec![(-128, 127), (-7, 7), (0, 15), (-128, 127)]);
    let kinds: Vec<ParamKind> = tg.params.iter().map(|p| p.kind).collect();
    assert_eq!(kinds.iter().filter(|k| **k == ParamKind::Weight).count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == ParamKind::Bias).count(), 4);
    let (x, _) = data(5, 9);
    let want = Evaluator::new(&model)
        .unwrap()
        .run(vec![x.clone()])
        .unwrap();
    let got = Evaluator::new(&tg.model).unwrap().run(vec![x]).unwrap();
    assert_eq!(bits(&got[0]), bits(&want[0]));
    // Exporting the untouched values gives the model back.
    let same = tg
        .export(&model, &HashMap::new(), ExportForm::Deploy)
        .unwrap();
    assert_eq!(print_all(&same), print_all(&model));
}

#[test]
fn scale_rules_follow_the_scheme() {
    for (scheme, weights, activations) in [
        ("lsq-w4a4", ScaleRule::Lsq, ScaleRule::Lsq),
        ("pact-w4a4", ScaleRule::Track, ScaleRule::Pact),
        ("w4a4", ScaleRule::Track, ScaleRule::Track),
    ] {
        let model: Model = qgraph_text::parse_model(&qdq_model(scheme)).unwrap();
        let tg = TrainingGraph::prepare(&model).unwrap();
        for q in &tg.quantizers {
            let want = if q.weight { weights } else { activations };
            assert_eq!(q.rule, want, "{scheme}");
        }
        let learned = tg
            .params
            .iter()
            .filter(|p| p.kind == ParamKind::Scale)
            .count();
        let want = tg.quantizers.iter().filter(|q| q.rule.learned()).count();
        assert_eq!(learned, want, "{scheme}");
    }
}

/// Trains `steps` steps; returns the first and last losses, the final
/// accuracy on held-out data, and the exported model.
fn fit(scheme: &str, optimizer: Optimizer, lr: f32, steps: usize) -> (f64, f64, f64, Model) {
    fit_on(scheme, optimizer, lr, steps, 2)
}

fn fit_on(
    scheme: &str,
    optimizer: Optimizer,
    lr: f32,
    steps: usize,
    threads: usize,
) -> (f64, f64, f64, Model) {
    fit_model(&qdq_model(scheme), optimizer, lr, steps, threads)
}

fn fit_model(
    text: &str,
    optimizer: Optimizer,
    lr: f32,
    steps: usize,
    threads: usize,
) -> (f64, f64, f64, Model) {
    let model: Model = qgraph_text::parse_model(text).unwrap();
    let config = Config {
        batch: 24,
        lr,
        optimizer,
        total_steps: steps,
        threads,
        ..Config::default()
    };
    let mut trainer = Trainer::new(&model, config).unwrap();
    let (train_x, train_y) = data(24 * 4, 3);
    let Tensor::F32(all) = &train_x else {
        unreachable!()
    };
    let (mut first, mut last) = (None, 0.0);
    let (qm, fm) = trainer.models();
    let opts = trainer.evaluator_options();
    let q = Evaluator::with_options(&qm, opts).unwrap();
    // No quant delay: the float variant is not needed.
    assert!(fm.is_none());
    for s in 0..steps {
        let b = s % 4;
        let xb = Tensor::F32(
            all.slice(qgraph_ir::ndarray::s![b * 24..(b + 1) * 24, .., .., ..])
                .to_owned()
                .into_dyn(),
        );
        let report = trainer
            .step(
                &q,
                None,
                xb,
                Targets::Labels(&train_y[b * 24..(b + 1) * 24]),
            )
            .unwrap();
        first.get_or_insert(report.loss);
        last = report.loss;
    }
    let trained = trainer.export(&model, ExportForm::Deploy).unwrap();
    let (test_x, test_y) = data(60, 4);
    let out = Evaluator::new(&trained).unwrap().run(vec![test_x]).unwrap();
    let Tensor::F32(logits) = &out[0] else {
        unreachable!()
    };
    let flat: Vec<f32> = logits.iter().copied().collect();
    let correct = qgraph_train::loss::correct_top1(&flat, test_y.len(), &test_y);
    (first.unwrap(), last, correct as f64 / 60.0, trained)
}

#[test]
fn training_fits_a_small_problem_under_every_scale_rule() {
    for (scheme, optimizer, lr) in [
        ("w4a4", Optimizer::Sgd { momentum: 0.9 }, 0.05),
        ("lsq-w4a4", Optimizer::Sgd { momentum: 0.9 }, 0.05),
        ("pact-w4a4", Optimizer::adam(), 0.03),
    ] {
        let (first, last, accuracy, trained) = fit(scheme, optimizer, lr, 40);
        assert!(last < 0.6 * first, "{scheme}: loss {first} -> {last}");
        assert!(accuracy >= 0.9, "{scheme}: held-out accuracy {accuracy}");
        // The narrow grid's Clip follows its (tracked or learned) scale.
        let g = &trained.graph;
        let get = |name: &str| match &g
            .initializer(g.value_by_name(name).unwrap())
            .unwrap()
            .tensor
        {
            Tensor::F32(a) => a.iter().next().copied().unwrap(),
            t => panic!("{}", t.dtype()),
        };
        assert_eq!(get("ahi"), 15.0 * get("as"), "{scheme}");
        assert_eq!(get("alo"), 0.0);
        if scheme != "w4a4" {
            assert_ne!(
                get("as"),
                0.2,
                "{scheme}: the activation scale did not move"
            );
        }
    }
}

#[test]
fn power_of_two_scales_stay_powers_of_two() {
    let text = qdq_model("w4a4").replace(
        "meta \"qgraph.scheme\" = \"w4a4\"",
        "meta \"qgraph.scheme\" = \"w4a4\"\nmeta \"qgraph.scales\" = \"powers of two\"",
    );
    assert!(text.contains("powers of two"));
    let (first, last, _, trained) = fit_model(&text, Optimizer::Sgd { momentum: 0.9 }, 0.05, 20, 2);
    assert!(last < first, "loss {first} -> {last}");
    let g = &trained.graph;
    let Tensor::F32(ws) = &g
        .initializer(g.value_by_name("ws").unwrap())
        .unwrap()
        .tensor
    else {
        panic!("ws is not f32");
    };
    // The weight scales tracked their channels' extremes onto powers of two.
    for &s in ws.iter() {
        assert_eq!(qgraph_quant::pow2_neighbours(s).0, s, "scale {s}");
    }
}

#[test]
fn two_runs_with_one_seed_agree_to_the_bit_whatever_the_thread_count() {
    let a = fit_on("lsq-w4a4", Optimizer::adam(), 0.01, 6, 1).3;
    let b = fit_on("lsq-w4a4", Optimizer::adam(), 0.01, 6, 3).3;
    assert_eq!(print_all(&a), print_all(&b));
}

#[test]
fn batch_statistics_update_the_running_ones() {
    let model: Model = qgraph_text::parse_model(&qdq_model("w4a4")).unwrap();
    let mut trainer = Trainer::new(
        &model,
        Config {
            batch: 12,
            lr: 1e-6,
            // The batch normalization folds, so its statistics freeze by
            // default half-way, at step 5; this is step 0.
            total_steps: 10,
            ..Config::default()
        },
    )
    .unwrap();
    let (qm, _) = trainer.models();
    let q = Evaluator::with_options(&qm, trainer.evaluator_options()).unwrap();
    let (x, y) = data(12, 5);
    // Batch statistics are kept for the BatchNormalization node.
    let params = HashMap::new();
    let tape = q.record(vec![x.clone()], &params, Mode::Training).unwrap();
    let bn = qm.graph.node_by_name("bn").unwrap();
    assert_eq!(tape.saved(bn).map(|s| s.len()), Some(2));
    drop(tape);
    trainer.step(&q, None, x, Targets::Labels(&y)).unwrap();
    // The checkpoint form keeps the batch normalization the trainer folds.
    let trained = trainer.export(&model, ExportForm::Checkpoint).unwrap();
    let g = &trained.graph;
    let mean = &g
        .initializer(g.value_by_name("mean").unwrap())
        .unwrap()
        .tensor;
    let var = &g
        .initializer(g.value_by_name("var").unwrap())
        .unwrap()
        .tensor;
    let (Tensor::F32(mean), Tensor::F32(var)) = (mean, var) else {
        unreachable!()
    };
    // Moved by a tenth of the way towards the batch's statistics.
    assert!(mean.iter().all(|&m| m != 0.0));
    assert!(var.iter().all(|&v| v != 1.0 && v > 0.0));
}

/// Jacob et al. 2018's folding: while training, the weight quantizer sees
/// `w gamma / sqrt(var + eps)` and batch statistics normalize; frozen, the
/// training graph computes what the exported graph (the batch
/// normalization folded into the convolution) computes.
#[test]
fn batch_normalization_folds_into_its_convolution_while_training() {
    for scheme in ["w4a4", "lsq-w4a4"] {
        folds_while_training(scheme);
    }
}

fn folds_while_training(scheme: &str) {
    let mut text = qdq_model(scheme);
    if scheme.starts_with("lsq") {
        // An outlier beyond LSQ's initial range (7 s, s = 2 <|w|> / sqrt(7)):
        // the exported weight must hold it on the grid, as FakeQuantize did.
        let at = text.find("init %w = f32[4,2,3,3] [").unwrap() + 24;
        let end = at + text[at..].find(',').unwrap();
        text.replace_range(at..end, "20.0");
    }
    let model: Model = qgraph_text::parse_model(&text).unwrap();
    let mut trainer = Trainer::new(
        &model,
        Config {
            batch: 24,
            lr: 0.05,
            total_steps: 8,
            // Running statistics fixed in the LSQ case: the outlier stays
            // beyond the learned range (a growing variance would shrink the
            // folded weight into it).
            bn_freeze_step: Some(if scheme.starts_with("lsq") { 0 } else { 5 }),
            ..Config::default()
        },
    )
    .unwrap();
    assert_eq!(trainer.graph().folds.len(), 1);
    let (qm, _) = trainer.models();
    let q = Evaluator::with_options(&qm, trainer.evaluator_options()).unwrap();
    let (x, y) = data(24, 6);
    for _ in 0..8 {
        trainer
            .step(&q, None, x.clone(), Targets::Labels(&y))
            .unwrap();
    }
    let deployed = trainer.export(&model, ExportForm::Deploy).unwrap();
    let g = &deployed.graph;
    assert!(
        g.node_by_name("bn").is_none(),
        "the batch normalization stayed"
    );
    for name in ["g", "beta", "mean", "var"] {
        assert!(g.value_by_name(name).is_none(), "'{name}' stayed");
    }
    let conv = g.node(g.node_by_name("conv").unwrap());
    assert_eq!(g.value(conv.outputs()[0].unwrap()).name(), "n");
    let get = |name: &str| match &g
        .initializer(g.value_by_name(name).unwrap())
        .unwrap()
        .tensor
    {
        Tensor::F32(a) => a.iter().copied().collect::<Vec<f32>>(),
        t => panic!("{}", t.dtype()),
    };
    // Tracked weight scales are their folded channels' extremes over 7;
    // learned ones hold the folded weights on their grid, [-7 s, 7 s].
    let (w, ws) = (get("w"), get("ws"));
    for (c, s) in ws.iter().enumerate() {
        let amax = w[c * 18..(c + 1) * 18]
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        if scheme.starts_with("lsq") {
            assert!(
                amax <= 7.0 * s,
                "{scheme} channel {c}: {amax} beyond 7 * {s}"
            );
        } else {
            assert!(
                (amax / 7.0 - s).abs() <= 1e-6 * s,
                "channel {c}: {amax} / 7 vs {s}"
            );
        }
    }
    let (test, _) = data(30, 7);
    let want = Evaluator::new(&deployed)
        .unwrap()
        .run(vec![test.clone()])
        .unwrap();
    let values = trainer.current_values();
    let tape = q.record(vec![test], &values, Mode::Inference).unwrap();
    let got = tape.outputs().unwrap();
    let (Tensor::F32(a), Tensor::F32(b)) = (&got[0], &want[0]) else {
        unreachable!()
    };
    let worst = a
        .iter()
        .zip(b.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst < 1e-4,
        "{scheme}: training graph and deployed graph differ by {worst}"
    );
    // The checkpoint keeps the batch normalization and says its weight
    // scales are the folded ones; a trainer resumes from it with the same
    // values.
    let checkpoint = trainer.export(&model, ExportForm::Checkpoint).unwrap();
    assert!(checkpoint.graph.node_by_name("bn").is_some());
    let resumed = Trainer::new(
        &checkpoint,
        Config {
            fold_batch_norm: true,
            ..Config::default()
        },
    )
    .unwrap();
    let again = resumed.export(&model, ExportForm::Deploy).unwrap();
    assert_eq!(print_all(&again), print_all(&deployed));
}

/// LSQ's step sizes start from the folded weights when the batch
/// normalization folds in.
#[test]
fn lsq_steps_start_from_the_folded_weights() {
    let mut text = qdq_model("lsq-w4a4");
    // A gamma far from 1 makes folded and unfolded weights differ.
    text = text.replace("[1.0, 0.9, 1.1, 1.0]", "[4.0, 0.5, 2.0, 1.0]");
    let model: Model = qgraph_text::parse_model(&text).unwrap();
    let trainer = Trainer::new(&model, Config::default()).unwrap();
    let tg = trainer.graph();
    let q = &tg.quantizers[tg.folds[0].quantizer];
    let values = trainer.current_values();
    let Tensor::F32(s) = &values[&q.scale] else {
        unreachable!()
    };
    let Tensor::F32(w) = &values[&q.input] else {
        unreachable!()
    };
    let k = [4.0f32, 0.5, 2.0, 1.0].map(|g| g / (1.0f32 + 1e-5).sqrt());
    for (c, s) in s.iter().enumerate() {
        let mean = w
            .iter()
            .skip(c * 18)
            .take(18)
            .map(|v| (v * k[c]).abs())
            .sum::<f32>()
            / 18.0;
        let want = 2.0 * mean / 7f32.sqrt();
        assert!(
            (s - want).abs() <= 1e-5 * want,
            "channel {c}: {s} vs {want}"
        );
    }
}

/// DoReFa (Zhou et al. 2016, eq. 9): a weight trains as a latent `v` that
/// the quantizer sees as `tanh(v) / max|tanh(v)|`, times the weight's
/// largest |w| so the layer keeps its magnitude: the training graph starts
/// from the model's weights, and a trained weight's largest |w| stays.
#[test]
fn dorefa_weights_train_through_tanh() {
    let model: Model = qgraph_text::parse_model(&qdq_model("dorefa-w4a4")).unwrap();
    let tg = TrainingGraph::prepare(&model).unwrap();
    let weights: Vec<_> = tg.quantizers.iter().filter(|q| q.weight).collect();
    assert_eq!(weights.len(), 2);
    assert!(weights.iter().all(|q| q.tanh_scale.is_some()));
    let g = &tg.model.graph;
    let original = |name: &str| match &model
        .graph
        .initializer(model.graph.value_by_name(name).unwrap())
        .unwrap()
        .tensor
    {
        Tensor::F32(a) => a.clone(),
        t => panic!("{}", t.dtype()),
    };
    for q in &weights {
        let name = g.value(q.input).name();
        let Tensor::F32(latent) = &g.initializer(q.input).unwrap().tensor else {
            unreachable!()
        };
        let back = qgraph_train::graph::tanh_normalized(latent, q.tanh_scale.unwrap());
        let w = original(name);
        let largest = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(q.tanh_scale, Some(largest));
        for (a, b) in back.iter().zip(w.iter()) {
            assert!((a - b).abs() <= 1e-6 * largest, "'{name}': {a} vs {b}");
        }
    }
    let (first, last, accuracy, trained) =
        fit("dorefa-w4a4", Optimizer::Sgd { momentum: 0.9 }, 0.05, 40);
    assert!(last < 0.6 * first, "loss {first} -> {last}");
    assert!(accuracy >= 0.9, "held-out accuracy {accuracy}");
    // The last layer's weight ("w" folds with its batch normalization):
    // trained, its largest |w| where it was.
    let g = &trained.graph;
    let Tensor::F32(w) = &g
        .initializer(g.value_by_name("fc").unwrap())
        .unwrap()
        .tensor
    else {
        unreachable!()
    };
    let before = original("fc");
    let largest = |a: &ArrayD<f32>| a.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!((largest(w) - largest(&before)).abs() <= 1e-6 * largest(&before));
    assert_ne!(w, &before, "'fc' did not train");
}

/// A folded batch normalization freezes half-way unless told otherwise.
#[test]
fn folded_batch_normalization_freezes_half_way_by_default() {
    let model: Model = qgraph_text::parse_model(&qdq_model("w4a4")).unwrap();
    let running_mean = |trainer: &Trainer| {
        let trained = trainer.export(&model, ExportForm::Checkpoint).unwrap();
        let g = &trained.graph;
        g.initializer(g.value_by_name("mean").unwrap())
            .unwrap()
            .tensor
            .clone()
    };
    for (freeze, updates) in [(None, 2), (Some(usize::MAX), 4)] {
        let mut trainer = Trainer::new(
            &model,
            Config {
                batch: 12,
                lr: 1e-6,
                total_steps: 4,
                bn_freeze_step: freeze,
                ..Config::default()
            },
        )
        .unwrap();
        let (qm, _) = trainer.models();
        let q = Evaluator::with_options(&qm, trainer.evaluator_options()).unwrap();
        let mut changed = 0;
        for s in 0..4 {
            let (x, y) = data(12, 20 + s);
            let before = running_mean(&trainer);
            trainer.step(&q, None, x, Targets::Labels(&y)).unwrap();
            changed += (running_mean(&trainer) != before) as usize;
        }
        assert_eq!(changed, updates, "{freeze:?}");
    }
}

/// A Relu or Clip whose output only a quantizer reads becomes part of the
/// FakeQuantize: one pass over memory instead of two, with the Q/DQ
/// graph's bits forward and its straight-through gradients backward.
#[test]
fn a_quantizer_takes_over_the_relu_or_clip_before_it() {
    let text = r#"ir_version 8
opset "" 13

graph main {
  input %x: f32[N,4]
  output %y: f32[N,3]
  init %w1 = f32[5,4] [0.3, -0.2, 0.5, 0.1, -0.4, 0.6, 0.2, -0.3, 0.1, 0.1, -0.5, 0.4, 0.2, -0.1, 0.3, 0.6, -0.6, 0.2, 0.4, -0.2]
  init %w2 = f32[3,5] [0.5, -0.3, 0.2, 0.1, -0.4, 0.3, 0.4, -0.2, 0.6, 0.1, -0.1, 0.2, 0.5, -0.5, 0.3]
  init %s1 = f32[] [0.01]
  init %z1 = u8[] [0]
  init %s2 = f32[] [0.004]
  init %z2 = i8[] [0]
  init %lo = f32[] [-0.3]
  init %hi = f32[] [0.35]
  fc1: %h = Gemm(%x, %w1) {transB = 1}
  relu: %r = Relu(%h)
  q1: %rq = QuantizeLinear(%r, %s1, %z1)
  dq1: %rd = DequantizeLinear(%rq, %s1, %z1)
  fc2: %o = Gemm(%rd, %w2) {transB = 1}
  clip: %c = Clip(%o, %lo, %hi)
  q2: %cq = QuantizeLinear(%c, %s2, %z2)
  dq2: %y = DequantizeLinear(%cq, %s2, %z2)
}
"#;
    let model: Model = qgraph_text::parse_model(text).unwrap();
    let tg = TrainingGraph::prepare(&model).unwrap();
    let g = &tg.model.graph;
    let ops: Vec<&str> = g
        .node_ids()
        .into_iter()
        .map(|n| g.node(n).op_type.as_str())
        .collect();
    assert!(!ops.contains(&"Relu") && !ops.contains(&"Clip"), "{ops:?}");
    let clamps: Vec<Option<(f32, f32)>> = tg.quantizers.iter().map(|q| q.clamp).collect();
    assert_eq!(clamps, vec![Some((0.0, f32::INFINITY)), Some((-0.3, 0.35))]);
    let x: Vec<f32> = values(6 * 4, 31).iter().map(|v| v * 2.0).collect();
    let x = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[6, 4]), x).unwrap());
    // Forward: the Q/DQ graph's bits.
    let want = Evaluator::new(&model)
        .unwrap()
        .run(vec![x.clone()])
        .unwrap();
    let got = Evaluator::new(&tg.model)
        .unwrap()
        .run(vec![x.clone()])
        .unwrap();
    assert_eq!(bits(&got[0]), bits(&want[0]));
    // Backward: the Q/DQ graph's straight-through gradients, to the
    // weights and the input.
    let seed = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[6, 3]), values(18, 32)).unwrap());
    let grads = |m: &Model| {
        let ev = Evaluator::new(m).unwrap();
        let g = &m.graph;
        let params: HashMap<_, _> = ["w1", "w2"]
            .iter()
            .map(|n| {
                let v = g.value_by_name(n).unwrap();
                (v, g.initializer(v).unwrap().tensor.clone())
            })
            .collect();
        let tape = ev.record(vec![x.clone()], &params, Mode::Training).unwrap();
        let wrt: Vec<_> = ["x", "w1", "w2"]
            .iter()
            .map(|n| g.value_by_name(n).unwrap())
            .collect();
        let out = tape
            .backward(vec![(g.outputs()[0], seed.clone())], &wrt)
            .unwrap();
        wrt.iter()
            .map(|v| match &out[v] {
                Tensor::F32(a) => a.iter().copied().collect::<Vec<f32>>(),
                t => panic!("{}", t.dtype()),
            })
            .collect::<Vec<_>>()
    };
    for (a, b) in grads(&tg.model).iter().zip(grads(&model)) {
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        assert!(a.iter().any(|&v| v != 0.0));
    }
    // Before the quant delay ends, only the Relu and the Clip act: the
    // float graph's bits.
    let trainer = Trainer::new(
        &model,
        Config {
            quant_delay: 5,
            ..Config::default()
        },
    )
    .unwrap();
    let (_, float) = trainer.models();
    let float_text = text
        .replace("  q1: %rq = QuantizeLinear(%r, %s1, %z1)\n", "")
        .replace("  dq1: %rd = DequantizeLinear(%rq, %s1, %z1)\n", "")
        .replace("Gemm(%rd, %w2)", "Gemm(%r, %w2)")
        .replace("clip: %c = Clip", "clip: %y = Clip")
        .replace("  q2: %cq = QuantizeLinear(%c, %s2, %z2)\n", "")
        .replace("  dq2: %y = DequantizeLinear(%cq, %s2, %z2)\n", "");
    let float_model: Model = qgraph_text::parse_model(&float_text).unwrap();
    let want = Evaluator::new(&float_model)
        .unwrap()
        .run(vec![x.clone()])
        .unwrap();
    let got = Evaluator::new(&float.unwrap())
        .unwrap()
        .run(vec![x])
        .unwrap();
    assert_eq!(bits(&got[0]), bits(&want[0]));
}

/// A transformer encoder block as PyTorch exports it, on int64 token ids
/// (vocabulary 7, token 0 pads, 4 positions, width 8, two heads): token
/// embeddings (Gather) plus positions (Expand), LayerNormalization,
/// attention with a padding mask (Where), the Erf form of GELU, residual
/// Adds, mean pooling and a classifier Gemm.
fn encoder_block() -> String {
    let init = |name: &str, shape: &[usize], seed: u64, k: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = values(n, seed).iter().map(|v| offset + k * v).collect();
        format!("  init %{name} = f32{shape:?} [{}]", list(&v))
    };
    let inits = [
        init("emb", &[7, 8], 201, 1.0, 0.0),
        init("pos", &[4, 8], 202, 0.5, 0.0),
        init("ln1_s", &[8], 203, 0.2, 1.0),
        init("ln1_b", &[8], 204, 0.1, 0.0),
        init("wq", &[8, 8], 205, 0.5, 0.0),
        init("bq", &[8], 206, 0.1, 0.0),
        init("wk", &[8, 8], 207, 0.5, 0.0),
        init("wv", &[8, 8], 208, 0.5, 0.0),
        init("wo", &[8, 8], 209, 0.5, 0.0),
        init("ln2_s", &[8], 210, 0.2, 1.0),
        init("ln2_b", &[8], 211, 0.1, 0.0),
        init("w1", &[8, 16], 212, 0.5, 0.0),
        init("b1", &[16], 213, 0.1, 0.0),
        init("w2", &[16, 8], 214, 0.3, 0.0),
        init("wc", &[3, 8], 215, 0.5, 0.0),
        init("bc", &[3], 216, 0.1, 0.0),
    ]
    .join("\n");
    let nodes = ENCODER_BLOCK_NODES;
    format!(
        r#"ir_version 8
opset "" 18

graph main {{
  input %ids: i64[N,4]
  output %logits: f32[N,3]
{inits}
{nodes}"#
    )
}

/// Token sequences of three classes: class c uses tokens 2c+1 and 2c+2,
/// with 0 to 2 padding tokens (0) at the end.
fn token_data(count: usize, seed: u64) -> (Tensor, Vec<i64>) {
    let noise = values(count * 5, seed);
    let mut ids = Vec::with_capacity(count * 4);
    let mut labels = Vec::with_capacity(count);
    for i in 0..count {
        let class = (i % 3) as i64;
        let r = &noise[i * 5..][..5];
        let padded = ((r[4] + 1.0) * 1.5) as usize;
        for (t, v) in r[..4].iter().enumerate() {
            ids.push(if t >= 4 - padded.min(2) {
                0
            } else {
                2 * class + 1 + (*v > 0.0) as i64
            });
        }
        labels.push(class);
    }
    (
        Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[count, 4]), ids).unwrap()),
        labels,
    )
}

/// A float transformer block on int64 token ids trains: the embedding
/// table, the layer normalizations, the MatMuls' weights and biases and
/// the classifier all learn, and the loss falls.
#[test]
fn a_transformer_encoder_block_on_token_ids_trains() {
    let text = encoder_block();
    let model: Model = qgraph_text::parse_model(&text).unwrap();
    let steps = 30;
    let config = Config {
        batch: 24,
        lr: 0.01,
        optimizer: Optimizer::adam(),
        total_steps: steps,
        threads: 2,
        ..Config::default()
    };
    let mut trainer = Trainer::new(&model, config).unwrap();
    let g = &trainer.graph().model.graph;
    let trained_names: Vec<(String, ParamKind)> = trainer
        .graph()
        .params
        .iter()
        .map(|p| (g.value(p.value).name().to_string(), p.kind))
        .collect();
    for (name, kind) in [
        ("emb", ParamKind::Weight),
        ("ln1_s", ParamKind::Bias),
        ("ln2_b", ParamKind::Bias),
        ("wq", ParamKind::Weight),
        ("bq", ParamKind::Bias),
        ("b1", ParamKind::Bias),
        ("wc", ParamKind::Weight),
        ("bc", ParamKind::Bias),
    ] {
        assert!(
            trained_names.contains(&(name.to_string(), kind)),
            "{name} is not trained as {kind:?}: {trained_names:?}"
        );
    }
    // Constants stay constants.
    for name in ["one", "half", "sqrt2", "temp", "neg", "pos"] {
        assert!(
            !trained_names.iter().any(|(n, _)| n == name),
            "{name} should not train"
        );
    }
    let (train_x, train_y) = token_data(24 * 4, 5);
    let Tensor::I64(all) = &train_x else {
        unreachable!()
    };
    let (qm, _) = trainer.models();
    let ev = Evaluator::with_options(&qm, trainer.evaluator_options()).unwrap();
    let mut losses = Vec::new();
    for s in 0..steps {
        let b = s % 4;
        let xb = Tensor::I64(
            all.slice(qgraph_ir::ndarray::s![b * 24..(b + 1) * 24, ..])
                .to_owned()
                .into_dyn(),
        );
        let report = trainer
            .step(
                &ev,
                None,
                xb,
                Targets::Labels(&train_y[b * 24..(b + 1) * 24]),
            )
            .unwrap();
        assert!(report.loss.is_finite(), "step {s}: loss {}", report.loss);
        losses.push(report.loss);
    }
    let (first, last) = (losses[0], losses[steps - 1]);
    assert!(last < 0.5 * first, "loss {first} -> {last}: {losses:?}");
    let trained = trainer.export(&model, ExportForm::Deploy).unwrap();
    let tg = &trained.graph;
    let og = &model.graph;
    for name in ["emb", "ln1_s", "ln2_b", "bq", "w1"] {
        let get = |g: &qgraph_ir::Graph| {
            bits(
                &g.initializer(g.value_by_name(name).unwrap())
                    .unwrap()
                    .tensor,
            )
        };
        assert_ne!(get(tg), get(og), "{name} did not move");
    }
    let (test_x, test_y) = token_data(60, 6);
    let out = Evaluator::new(&trained).unwrap().run(vec![test_x]).unwrap();
    let Tensor::F32(logits) = &out[0] else {
        unreachable!()
    };
    let flat: Vec<f32> = logits.iter().copied().collect();
    let correct = qgraph_train::loss::correct_top1(&flat, test_y.len(), &test_y);
    assert!(correct >= 54, "held-out accuracy {correct} of 60");
}
