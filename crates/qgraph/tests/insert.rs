//! `qgraph insert` as a library: TensorRT's placement on a small graph with
//! a residual connection, and calibrated Q/DQ graphs that keep the float
//! graph's function (output SQNR above a stated bound) and run in tract.

use qgraph::insert::{insert, Calibration, Method, Prepare};
use qgraph::ir::{Model, Tensor};
use qgraph::passes::{plan_qdq, InsertOptions, Placement};
use qgraph::quant::Scheme;

const MODEL: &str = r#"
ir_version 8
opset "" 13

graph main {
  input %x: f32[N,2,4,4]
  output %y: f32[N,3]
  init %w1 = f32[2,2,1,1] [0.5, -1.0, 0.25, 2.0]
  init %w2 = f32[2,2,3,3] [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8, -0.9, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 0.3, 0.1, -0.2, 0.5, -0.7, 0.9, -0.4, 0.6, 0.8]
  init %wg = f32[3,2] [1.0, -0.5, 0.25, 0.75, -1.5, 2.0]
  init %bg = f32[3] [0.1, 0.2, 0.3]
  c1: %c1 = Conv(%x, %w1)
  r1: %r1 = Relu(%c1)
  c2: %c2 = Conv(%r1, %w2) {pads = [1, 1, 1, 1]}
  add: %a = Add(%c2, %x)
  pool: %p = GlobalAveragePool(%a)
  flat: %f = Flatten(%p)
  gemm: %y = Gemm(%f, %wg, %bg) {transB = 1}
}
"#;

fn options(scheme: &str) -> InsertOptions {
    InsertOptions {
        scheme: Scheme::parse(scheme).unwrap(),
        placement: Placement::TensorRt,
        ends_at_8_bits: true,
        overrides: Vec::new(),
    }
}

#[test]
fn tensorrt_placement_quantizes_weighted_inputs_and_the_residual() {
    let model = qgraph::text::parse_model(MODEL).unwrap();
    let g = &model.graph;
    let plan = plan_qdq(&model, &options("int8")).unwrap();
    let mut sites: Vec<String> = plan
        .sites
        .iter()
        .map(|s| {
            let uses: Vec<String> = s
                .uses
                .iter()
                .map(|(n, slot)| format!("{}.{slot}", g.node(*n).name()))
                .collect();
            format!(
                "{} {} axis={:?} bits={} uses={}",
                g.value(s.value).name(),
                if s.weight { "weight" } else { "activation" },
                s.axis,
                s.scheme.grid.bits,
                uses.join(",")
            )
        })
        .collect();
    sites.sort();
    assert_eq!(
        sites,
        [
            "f activation axis=None bits=8 uses=gemm.0",
            "r1 activation axis=None bits=8 uses=c2.0",
            "w1 weight axis=Some(0) bits=8 uses=c1.1",
            "w2 weight axis=Some(0) bits=8 uses=c2.1",
            "wg weight axis=Some(0) bits=8 uses=gemm.1",
            "x activation axis=None bits=8 uses=c1.0,add.1",
        ]
    );
    // Low-bit schemes keep the first and last weighted layers at 8 bits.
    let plan = plan_qdq(&model, &options("w4a4")).unwrap();
    let bits = |name: &str| {
        let v = g.value_by_name(name).unwrap();
        plan.sites
            .iter()
            .find(|s| s.value == v)
            .unwrap()
            .scheme
            .grid
            .bits
    };
    assert_eq!((bits("w1"), bits("w2"), bits("wg")), (8, 4, 8));
    assert_eq!((bits("x"), bits("r1"), bits("f")), (8, 4, 8));
}

fn sqnr_db(reference: &Tensor, other: &Tensor) -> f64 {
    let (Tensor::F32(a), Tensor::F32(b)) = (reference, other) else {
        panic!("f32 outputs")
    };
    let signal: f64 = a.iter().map(|&v| (v as f64).powi(2)).sum();
    let noise: f64 = a
        .iter()
        .zip(b.iter())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    10.0 * (signal / noise.max(1e-30)).log10()
}

/// LeNet-5, the 64 digits of testdata, them as one batch, and the float
/// model's outputs on them.
fn lenet_on_digits() -> (Model, qgraph::data::Dataset, Tensor, Vec<Tensor>) {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let float = qgraph::load(&root.join("testdata/models/lenet5_mnist_clntrained.onnx"))
        .unwrap()
        .model;
    let data =
        qgraph::data::Dataset::load_npz(&root.join("testdata/data/mnist64.npz"), None, Some(""))
            .unwrap();
    let x = data.batch(0, data.len(), qgraph::data::Norm::None).unwrap();
    let reference = qgraph::eval::Evaluator::new(&float)
        .unwrap()
        .run(vec![x.clone()])
        .unwrap();
    (float, data, x, reference)
}

/// Calibration on every sample of `data` (not normalised, batches of 16,
/// nearest rounding).
fn every_sample(data: &qgraph::data::Dataset, method: Method) -> Calibration<'_> {
    Calibration {
        data,
        samples: (0..data.len()).collect(),
        norm: qgraph::data::Norm::None,
        batch: 16,
        method,
        rounding: qgraph::insert::Rounding::Nearest,
    }
}

/// Quantizes LeNet-5 on 64 digits with every method and checks the output
/// against the float model on the same digits: int8 within 30 dB SQNR.
#[test]
fn calibrated_lenet_keeps_its_function_with_every_method() {
    let (float, data, x, reference) = lenet_on_digits();
    for method in [
        Method::MinMax,
        Method::Percentile(99.99),
        Method::Entropy,
        Method::Mse,
    ] {
        let mut model: Model = float.clone();
        let calibration = every_sample(&data, method);
        let summary = insert(
            &mut model,
            &options("int8"),
            Prepare::Deploy,
            true,
            Some(&calibration),
            |_| {},
        )
        .unwrap();
        assert!(summary.report.unranged.is_empty());
        assert_eq!((summary.report.weights, summary.report.activations), (4, 4));
        assert_eq!(summary.report.bias_corrected, 4);
        let out = qgraph::eval::Evaluator::new(&model)
            .unwrap()
            .run(vec![x.clone()])
            .unwrap();
        let db = sqnr_db(&reference[0], &out[0]);
        assert!(db > 30.0, "{method:?}: output SQNR {db:.1} dB");
    }
}

/// Output-aware (GPTQ) rounding on LeNet-5 at 4-bit weights: every weight
/// rounded, each op's output error on the calibration inputs lower than
/// with nearest rounding, the network's output closer to the float one,
/// and the rounded weights on their grids (the Q/DQ pair gives them back
/// unchanged). A 16-bit grid on an opset-13 model is refused.
#[test]
fn gptq_rounding_lowers_the_output_error_of_low_bit_weights() {
    let (float, data, x, reference) = lenet_on_digits();
    let mut opts = options("w4a8");
    opts.ends_at_8_bits = false;
    let quantize = |rounding| {
        let mut model: Model = float.clone();
        let calibration = Calibration {
            data: &data,
            samples: (0..data.len()).collect(),
            norm: qgraph::data::Norm::None,
            batch: 16,
            method: Method::MinMax,
            rounding,
        };
        let summary = insert(
            &mut model,
            &opts,
            Prepare::Deploy,
            true,
            Some(&calibration),
            |_| {},
        )
        .unwrap();
        let out = qgraph::eval::Evaluator::new(&model)
            .unwrap()
            .run(vec![x.clone()])
            .unwrap();
        (model, summary, sqnr_db(&reference[0], &out[0]))
    };
    use qgraph::insert::Rounding;
    let (_, nearest, nearest_db) = quantize(Rounding::Nearest);
    assert!(nearest.report.rounding_gains_db.is_empty());
    let (model, gptq, gptq_db) = quantize(Rounding::GptqBelow8Bits);
    let gains = &gptq.report.rounding_gains_db;
    assert_eq!(gains.len(), 4, "{gains:?}");
    assert!(gains.iter().all(|&g| g > 0.5), "{gains:?}");
    assert!(
        gptq_db > nearest_db + 1.0,
        "gptq {gptq_db:.1} dB, nearest {nearest_db:.1} dB"
    );
    // Each rounded weight is what its Q/DQ pair computes from it.
    let g = &model.graph;
    let mut checked = 0;
    for n in g.node_ids() {
        let node = g.node(n);
        if node.op_type != "QuantizeLinear" {
            continue;
        }
        let v = node.inputs()[0].unwrap();
        let Some(init) = g.value(v).initializer() else {
            continue;
        };
        let constant = |i: usize| {
            &g.value(node.inputs()[i].unwrap())
                .initializer()
                .unwrap()
                .tensor
        };
        let (scale, zero) = (constant(1), constant(2));
        let inputs = [Some(&init.tensor), Some(scale), Some(zero)];
        let q = qgraph::eval::run_node(g, n, 13, &inputs).unwrap();
        let dq_node = g.consumers(node.outputs()[0].unwrap())[0].0;
        let inputs = [Some(&q[0]), Some(scale), Some(zero)];
        let back = qgraph::eval::run_node(g, dq_node, 13, &inputs).unwrap();
        assert_eq!(
            back[0],
            init.tensor,
            "'{}' is off its grid",
            g.value(v).name()
        );
        checked += 1;
    }
    assert_eq!(checked, 4);
    // 16-bit grids need opset 21.
    let mut wide = options("int8");
    wide.overrides =
        qgraph::insert::parse_overrides("[[override]]\nop = \"Conv\"\nactivation-bits = 16\n")
            .unwrap();
    let err = plan_qdq(&float, &wide).unwrap_err();
    assert!(err.contains("opset 21"), "{err}");
}

/// ONNX Runtime's placement: every tensor a quantizable op reads or writes,
/// a Relu after a convolution removed (its range lies inside [0, inf)), the
/// Gemm bias stored as int32; the graph still computes the float function
/// closely.
#[test]
fn ort_placement_quantizes_every_tensor_folds_relu_and_makes_int32_biases() {
    use qgraph::passes::{insert_qdq, Calibrated};
    let float = qgraph::text::parse_model(MODEL).unwrap();
    let mut model = float.clone();
    let mut opts = options("int8-asym");
    opts.placement = Placement::Ort;
    let plan = plan_qdq(&model, &opts).unwrap();
    let g = &model.graph;
    let mut names: Vec<String> = plan
        .sites
        .iter()
        .filter(|s| !s.weight)
        .map(|s| {
            let fold = s.fold.map(|n| format!(" fold {}", g.node(n).name()));
            format!("{}{}", g.value(s.value).name(), fold.unwrap_or_default())
        })
        .collect();
    names.sort();
    assert_eq!(names, ["a", "c2", "f", "p", "r1 fold r1", "x"]);
    let range = |name: &str, lo: f32, hi: f32| (g.value_by_name(name).unwrap(), (lo, hi));
    let ranges = [
        range("x", -3.0, 3.0),
        range("r1", 0.0, 8.0),
        range("c2", -20.0, 20.0),
        range("a", -20.0, 20.0),
        range("p", -10.0, 10.0),
        range("f", -10.0, 10.0),
    ]
    .into_iter()
    .collect();
    let calibrated = Calibrated {
        ranges,
        ..Default::default()
    };
    let report = insert_qdq(&mut model, &plan, &calibrated, false).unwrap();
    assert_eq!((report.folded, report.int32_biases), (1, 1));
    qgraph::ir::verify_model(&model).unwrap();
    let text = qgraph::show(&model, &Default::default());
    assert!(!text.contains("Relu("), "{text}");
    // The pair standing for the removed Relu's output still names it.
    let g = &model.graph;
    let names_r1 = g.node_ids().into_iter().any(|n| {
        g.node(n)
            .meta
            .iter()
            .any(|(k, v)| k == qgraph::passes::QUANTIZES_KEY && v == "r1")
    });
    assert!(names_r1, "{text}");
    assert!(text.contains("i32[3]"), "{text}");
    // Inputs inside the calibrated range: the output stays close.
    let x = Tensor::F32(qgraph::ir::ndarray::ArrayD::from_shape_fn(
        vec![4, 2, 4, 4],
        |i| ((i[0] * 31 + i[1] * 7 + i[2] * 3 + i[3]) as f32 * 0.7).sin() * 2.5,
    ));
    let run = |m: &Model| {
        qgraph::eval::Evaluator::new(m)
            .unwrap()
            .run(vec![x.clone()])
            .unwrap()
    };
    let db = sqnr_db(&run(&float)[0], &run(&model)[0]);
    assert!(db > 25.0, "output SQNR {db:.1} dB");
}

#[test]
fn overrides_exclude_layers_and_set_their_widths_later_rules_winning() {
    let model = qgraph::text::parse_model(MODEL).unwrap();
    let g = &model.graph;
    let mut opts = options("w4a4");
    opts.overrides = qgraph::insert::parse_overrides(
        r#"
[[override]]
op = "Conv"
weight-bits = 6

[[override]]
name = "^c2$"
weight-bits = 3
activation-bits = 5

[[override]]
op = "Gemm"
exclude = true
"#,
    )
    .unwrap();
    let plan = plan_qdq(&model, &opts).unwrap();
    let bits = |name: &str| {
        let v = g.value_by_name(name).unwrap();
        plan.sites
            .iter()
            .find(|s| s.value == v)
            .map(|s| s.scheme.grid.bits)
    };
    // c1 is the first weighted layer (8-bit activations by default), its
    // weights set to 6; c2's rule comes later and wins; the Gemm is float.
    assert_eq!((bits("w1"), bits("x")), (Some(6), Some(8)));
    assert_eq!((bits("w2"), bits("r1")), (Some(3), Some(5)));
    assert_eq!((bits("wg"), bits("f")), (None, None));
    for (text, want) in [
        (
            "[[override]]\nexclude = true",
            "override 1: give 'name' or 'op'",
        ),
        (
            "[[override]]\nname = \"(\"",
            "override 1: 'name' is not a regular expression",
        ),
        (
            "[[override]]\nop = \"Conv\"\nweight-bits = 1",
            "'weight-bits' must be from 2 to 16",
        ),
        (
            "[[override]]\nop = \"Conv\"\nbits = 4",
            "unknown key 'bits'",
        ),
        ("[layer]\nop = 1", "unknown key 'layer'"),
    ] {
        let err = qgraph::insert::parse_overrides(text).unwrap_err();
        assert!(err.contains(want), "{text}: {err}");
    }
}

/// The learned-range schemes start from their papers' rules: PACT's alpha
/// = 10 without data, LSQ's step 2<|w|>/sqrt(Qp) from the weights.
#[test]
fn learned_range_schemes_start_from_their_papers_rules() {
    let scale_of = |model: &Model, name: &str| -> Vec<f32> {
        let g = &model.graph;
        let v = g.value_by_name(&format!("{name}_scale")).unwrap();
        match &g.initializer(v).unwrap().tensor {
            Tensor::F32(a) => a.iter().copied().collect(),
            t => panic!("{t:?}"),
        }
    };
    let mut model = qgraph::text::parse_model(MODEL).unwrap();
    let summary = insert(
        &mut model,
        &options("pact-w4a4"),
        Prepare::Skip,
        false,
        None,
        |_| {},
    )
    .unwrap();
    assert!(summary.report.unranged.is_empty());
    assert!(summary.calibration.contains("PACT alpha = 10"));
    // r1 feeds the middle layer: 4 bits, [0, 10] over 15 steps.
    assert_eq!(scale_of(&model, "r1"), [10.0 / 15.0]);
    let mut model = qgraph::text::parse_model(MODEL).unwrap();
    insert(
        &mut model,
        &options("lsq-w4a4"),
        Prepare::Skip,
        false,
        None,
        |_| {},
    )
    .unwrap();
    let w2 = [
        0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7,
        -0.8, -0.9, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 0.3, 0.1, -0.2, 0.5, -0.7,
        0.9, -0.4, 0.6, 0.8,
    ];
    let mean = w2.iter().map(|v| v.abs() as f64).sum::<f64>() / w2.len() as f64;
    let want = (2.0 * mean / 7f64.sqrt()) as f32;
    let got = scale_of(&model, "w2");
    assert_eq!(got.len(), 1, "one step per layer");
    assert!((got[0] - want).abs() <= 1e-6 * want, "{got:?} vs {want}");
    // DoReFa: activations on [0, 1] (the network's input excepted, left
    // without a range without data), one weight scale per layer.
    let mut model = qgraph::text::parse_model(MODEL).unwrap();
    let summary = insert(
        &mut model,
        &options("dorefa-w4a4"),
        Prepare::Skip,
        false,
        None,
        |_| {},
    )
    .unwrap();
    assert_eq!(summary.report.unranged, ["x"]);
    assert_eq!(scale_of(&model, "r1"), [1.0 / 15.0]);
    assert_eq!(scale_of(&model, "w2"), [1.0 / 7.0]);
}

/// A folder of images calibrates like the arrays they came from: the 64
/// MNIST digits written as PNG files read back exactly (no resize or
/// crop), and resize + crop give the requested size whatever the input's.
#[test]
fn image_folders_decode_to_the_samples_and_preprocess_to_one_size() {
    use qgraph::data::{Dataset, Norm, Preprocess};
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let digits =
        Dataset::load_npz(&root.join("testdata/data/mnist64.npz"), None, Some("")).unwrap();
    let x = digits.batch(0, 8, Norm::None).unwrap();
    let Tensor::F32(a) = &x else { panic!() };
    let dir = tempfile::tempdir().unwrap();
    for i in 0..8 {
        let img = image::GrayImage::from_fn(28, 28, |c, r| {
            image::Luma([(a[[i, 0, r as usize, c as usize]] * 255.0).round() as u8])
        });
        img.save(dir.path().join(format!("digit{i}.png"))).unwrap();
    }
    let gray = Preprocess {
        gray: true,
        ..Preprocess::default()
    };
    let images = Dataset::load_images(dir.path(), gray).unwrap();
    assert_eq!(images.len(), 8);
    assert_eq!(
        images
            .select(&(0..8).collect::<Vec<_>>(), Norm::None)
            .unwrap(),
        x
    );
    // Another size: resized on its shorter side, then cropped.
    image::RgbImage::from_pixel(40, 30, image::Rgb([255, 0, 0]))
        .save(dir.path().join("wide.png"))
        .unwrap();
    let (prep, norm) = Preprocess::parse("resize=30,crop=28,gray,norm=none").unwrap();
    assert_eq!(norm, Some(Norm::None));
    let images = Dataset::load_images(dir.path(), prep).unwrap();
    let Tensor::F32(b) = images.select(&[0, 8], Norm::None).unwrap() else {
        panic!()
    };
    assert_eq!(b.shape(), [2, 1, 28, 28]);
    // Without a crop, sizes differ: an error naming the file.
    let err = Dataset::load_images(dir.path(), gray)
        .unwrap()
        .select(&[0, 8], Norm::None)
        .unwrap_err();
    assert!(err.contains("wide.png"), "{err}");
    assert!(Preprocess::parse("resize=0")
        .unwrap_err()
        .contains("positive size"));
    assert!(Preprocess::parse("blur=3")
        .unwrap_err()
        .contains("unknown preprocessing step 'blur'"));
}

/// PACT's alpha with data is where the calibration method ends the range:
/// the maximum with minmax, lower where mse clips a 2-bit grid.
#[test]
fn pact_alpha_follows_the_calibration_method() {
    let (float, data, _, _) = lenet_on_digits();
    let alpha = |method: Method| {
        let mut model: Model = float.clone();
        let calibration = every_sample(&data, method);
        let mut opts = options("pact-w2a2");
        opts.ends_at_8_bits = false;
        let summary = insert(
            &mut model,
            &opts,
            Prepare::Deploy,
            false,
            Some(&calibration),
            |_| {},
        )
        .unwrap();
        assert!(
            summary
                .calibration
                .contains("PACT alpha from the calibrated range"),
            "{}",
            summary.calibration
        );
        let g = &model.graph;
        // The first pooled activation's quantizer: 2-bit unsigned, alpha = 3 s.
        let v = g.value_by_name("/maxpool1/MaxPool_output_0_scale").unwrap();
        match &g.initializer(v).unwrap().tensor {
            Tensor::F32(a) => 3.0 * a.iter().next().copied().unwrap(),
            t => panic!("{t:?}"),
        }
    };
    let (max, mse) = (alpha(Method::MinMax), alpha(Method::Mse));
    assert!(mse < 0.8 * max, "mse alpha {mse}, maximum {max}");
}
