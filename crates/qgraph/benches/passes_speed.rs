//! The standard pass pipeline against reading + writing the same model,
//! measured in one run (compare ratios: the machine is shared). Models: the
//! largest shared model, and a ResNet-50-sized graph generated here (random
//! weights, the real layer structure: 53 convolutions with batch norm and
//! ReLU, 16 residual adds, about 25.6 M parameters).
//!
//!   cargo bench -p qgraph --bench passes_speed [-- REPEATS]

use qgraph::ir::{
    AttrValue, Attribute, Dim, Graph, Model, NewNode, Tensor, TensorType, ValueId, ValueType,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PIPELINE: &str =
    "infer-shapes,fold-constants,fold-bn,fold-pad,fuse-matmul-add,fuse-conv-bn-act,cleanup";

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Builds ResNet-50 (v1.5: stride on the 3x3) with pseudo-random weights.
struct Builder {
    g: Graph,
    seed: u64,
    count: usize,
}

impl Builder {
    fn random(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let data = (0..n)
            .map(|_| {
                self.seed ^= self.seed << 13;
                self.seed ^= self.seed >> 7;
                self.seed ^= self.seed << 17;
                ((self.seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect();
        Tensor::f32(shape, data).unwrap()
    }

    fn init(&mut self, name: &str, t: Tensor) -> ValueId {
        self.g.add_initializer(name, t).unwrap()
    }

    fn node(&mut self, op: &str, inputs: Vec<ValueId>, attrs: Vec<(&str, AttrValue)>) -> ValueId {
        self.count += 1;
        let name = format!("{}_{}", op.to_lowercase(), self.count);
        let out = self.g.add_value(format!("{name}_out"), None).unwrap();
        let mut n = NewNode::new(op).named(name).inputs(inputs).outputs([out]);
        n.attrs = attrs
            .into_iter()
            .map(|(k, v)| Attribute {
                name: k.into(),
                value: v,
                doc: String::new(),
            })
            .collect();
        self.g.add_node(n).unwrap();
        out
    }

    fn conv_bn(
        &mut self,
        x: ValueId,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        relu: bool,
    ) -> ValueId {
        let id = self.count;
        let fan = (cin * k * k) as f32;
        let w = self.random(&[cout, cin, k, k], 2.0 / fan.sqrt());
        let w = self.init(&format!("w{id}"), w);
        let p = (k / 2) as i64;
        let c = self.node(
            "Conv",
            vec![x, w],
            vec![
                ("kernel_shape", AttrValue::Ints(vec![k as i64; 2])),
                ("strides", AttrValue::Ints(vec![stride as i64; 2])),
                ("pads", AttrValue::Ints(vec![p; 4])),
            ],
        );
        let mut stats = Vec::new();
        for (i, (base, spread)) in [(1.0, 0.2), (0.0, 0.2), (0.0, 0.2), (1.0, 0.2)]
            .iter()
            .enumerate()
        {
            let mut t = self.random(&[cout], *spread);
            if let Tensor::F32(a) = &mut t {
                a.mapv_inplace(|v| v + base);
            }
            stats.push(self.init(&format!("bn{id}_{i}"), t));
        }
        let mut inputs = vec![c];
        inputs.extend(stats);
        let y = self.node(
            "BatchNormalization",
            inputs,
            vec![("epsilon", AttrValue::Float(1e-5))],
        );
        if relu {
            self.node("Relu", vec![y], vec![])
        } else {
            y
        }
    }
}

fn resnet50() -> Model {
    let mut b = Builder {
        g: Graph::new("resnet50"),
        seed: 0x2545f4914f6cdd1d,
        count: 0,
    };
    let x =
        b.g.add_input(
            "input",
            Some(ValueType::Tensor(TensorType {
                dtype: Some(qgraph::ir::DataType::F32),
                shape: Some(vec![
                    Dim::Symbol("N".into()),
                    Dim::Known(3),
                    Dim::Known(224),
                    Dim::Known(224),
                ]),
            })),
        )
        .unwrap();
    let mut h = b.conv_bn(x, 3, 64, 7, 2, true);
    h = b.node(
        "MaxPool",
        vec![h],
        vec![
            ("kernel_shape", AttrValue::Ints(vec![3, 3])),
            ("strides", AttrValue::Ints(vec![2, 2])),
            ("pads", AttrValue::Ints(vec![1; 4])),
        ],
    );
    let mut cin = 64;
    for (stage, blocks) in [3usize, 4, 6, 3].into_iter().enumerate() {
        let width = 64 << stage;
        for block in 0..blocks {
            let stride = if block == 0 && stage > 0 { 2 } else { 1 };
            let a = b.conv_bn(h, cin, width, 1, 1, true);
            let a = b.conv_bn(a, width, width, 3, stride, true);
            let a = b.conv_bn(a, width, width * 4, 1, 1, false);
            let skip = if block == 0 {
                b.conv_bn(h, cin, width * 4, 1, stride, false)
            } else {
                h
            };
            let sum = b.node("Add", vec![a, skip], vec![]);
            h = b.node("Relu", vec![sum], vec![]);
            cin = width * 4;
        }
    }
    let pooled = b.node("GlobalAveragePool", vec![h], vec![]);
    let flat = b.node("Flatten", vec![pooled], vec![]);
    let fw = b.random(&[1000, 2048], 0.05);
    let fw = b.init("fc_w", fw);
    let fb = b.random(&[1000], 0.01);
    let fb = b.init("fc_b", fb);
    let logits = b.node(
        "Gemm",
        vec![flat, fw, fb],
        vec![("transB", AttrValue::Int(1))],
    );
    b.g.set_outputs(vec![logits]).unwrap();
    Model::new(b.g, 13)
}

fn measure(name: &str, path: &Path, repeats: usize) {
    let out = tempfile::tempdir().unwrap();
    let dst = out.path().join("out.onnx");
    let (mut read, mut write, mut passes) = (vec![], vec![], vec![]);
    let mut counts = (0, 0);
    for i in 0..repeats + 1 {
        let t0 = Instant::now();
        let model = qgraph::load(path).unwrap().model;
        let t1 = Instant::now();
        qgraph::save(&model, &dst, &qgraph::SaveOptions::default()).unwrap();
        let t2 = Instant::now();
        let mut m = model.clone();
        let t3 = Instant::now();
        let mut last = t3;
        let mut per_pass = Vec::new();
        qgraph::passes::Driver::from_pipeline(PIPELINE)
            .unwrap()
            .run_with(&mut m, |pass, _| {
                per_pass.push((pass.to_string(), last.elapsed()));
                last = Instant::now();
            })
            .unwrap();
        let t4 = Instant::now();
        if i == repeats && std::env::var_os("QGRAPH_PROFILE").is_some() {
            for (pass, d) in &per_pass {
                eprintln!("  {name}: {pass:<18} {:8.1} ms (with verification)", ms(*d));
            }
        }
        counts = (model.graph.node_count(), m.graph.node_count());
        if i > 0 {
            read.push(t1 - t0);
            write.push(t2 - t1);
            passes.push(t4 - t3);
        }
    }
    let (r, w, p) = (median(read), median(write), median(passes));
    let mb = std::fs::metadata(path).unwrap().len() as f64 / 1e6;
    println!(
        "| {name} | {mb:.1} | {} -> {} | {:.1} | {:.1} | {:.1} | {:.2} |",
        counts.0,
        counts.1,
        ms(r),
        ms(w),
        ms(p),
        p.as_secs_f64() / (r + w).as_secs_f64()
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let repeats: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(5);
    println!("pipeline: {PIPELINE}\n");
    println!("| model | MB | nodes | read ms | write ms | passes ms | passes / (read + write) |");
    println!("|---|---:|---|---:|---:|---:|---:|");
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models");
    match std::fs::read_dir(&shared) {
        Ok(entries) => {
            let largest = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
                .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0));
            if let Some(p) = largest {
                let name = p.file_name().unwrap().to_string_lossy().to_string();
                measure(&name, &p, repeats);
            }
        }
        Err(_) => eprintln!("SKIPPED: {} is absent", shared.display()),
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet50_random.onnx");
    qgraph::save(&resnet50(), &path, &qgraph::SaveOptions::default()).unwrap();
    measure("ResNet-50 (generated)", &path, repeats);
}
