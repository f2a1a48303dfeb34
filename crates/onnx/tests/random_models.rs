//! Property tests over random models that use every data type, attribute
//! kind, subgraphs (with captured values), functions, docs and metadata:
//! - ONNX: write -> read gives the same IR, and writing is deterministic;
//! - text: print -> parse -> print is identical, and with all data printed,
//!   parse(print(m)) == m;
//! - mutated bytes of a valid file never make the reader panic.

use proptest::prelude::*;
use qgraph_ir::{
    AttrKind, AttrValue, Attribute, DataType, Dim, Function, Graph, Model, NewNode, OpsetImport,
    Tensor, TensorType, ValueId, ValueType,
};
use qgraph_text::{parse_model, print_model, PrintOptions};

/// xorshift64*: a small deterministic generator driven by proptest's seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn text(&mut self) -> String {
        const PARTS: &[&str] = &[
            "a", "Z", "_", "/", ".", "-", "0", ":", " ", "\"", "\\", "\n", "é", "∑", "\t", "#", "%",
        ];
        (0..self.below(6))
            .map(|_| PARTS[self.below(PARTS.len())])
            .collect()
    }
    fn name(&mut self, prefix: &str) -> String {
        format!("{prefix}{}{}", self.text(), self.next() % 1000)
    }
}

fn canonical_nans(t: Tensor) -> Tensor {
    match t {
        Tensor::F32(a) => Tensor::F32(a.mapv(|x| if x.is_nan() { f32::NAN } else { x })),
        Tensor::F64(a) => Tensor::F64(a.mapv(|x| if x.is_nan() { f64::NAN } else { x })),
        Tensor::F16(a) => Tensor::F16(a.mapv(|x| {
            if x.is_nan() {
                qgraph_ir::half::f16::NAN
            } else {
                x
            }
        })),
        Tensor::BF16(a) => Tensor::BF16(a.mapv(|x| {
            if x.is_nan() {
                qgraph_ir::half::bf16::NAN
            } else {
                x
            }
        })),
        t => t,
    }
}

fn random_tensor(r: &mut Rng) -> Tensor {
    let dtype = DataType::ALL[r.below(DataType::ALL.len())];
    let shape: Vec<usize> = (0..r.below(4)).map(|_| r.below(4)).collect();
    let count: usize = shape.iter().product();
    if dtype == DataType::String {
        let values = (0..count)
            .map(|_| (0..r.below(5)).map(|_| r.next() as u8).collect())
            .collect();
        return Tensor::from_strings(&shape, values).unwrap();
    }
    let len = dtype.packed_len(count).unwrap();
    let mut bytes: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
    if dtype == DataType::Bool {
        bytes.iter_mut().for_each(|b| *b &= 1);
    }
    canonical_nans(Tensor::from_le_bytes(dtype, &shape, &bytes).unwrap())
}

fn random_type(r: &mut Rng, depth: usize) -> ValueType {
    let tensor = |r: &mut Rng| TensorType {
        dtype: if r.chance(5) {
            None
        } else {
            Some(DataType::ALL[r.below(DataType::ALL.len())])
        },
        shape: if r.chance(10) {
            None
        } else {
            Some(
                (0..r.below(4))
                    .map(|_| match r.below(4) {
                        0 => Dim::Known(r.below(300) as i64 - 1),
                        1 => Dim::Symbol(r.name("N")),
                        2 => Dim::Unknown,
                        _ => Dim::Known(1),
                    })
                    .collect(),
            )
        },
    };
    match if depth > 1 { 0 } else { r.below(8) } {
        0..=2 => ValueType::Tensor(tensor(r)),
        3 => ValueType::SparseTensor(tensor(r)),
        4 => ValueType::Sequence(Box::new(random_type(r, depth + 1))),
        5 => ValueType::Optional(Box::new(random_type(r, depth + 1))),
        6 => ValueType::Map(DataType::I64, Box::new(random_type(r, depth + 1))),
        _ => ValueType::Opaque {
            domain: r.text(),
            name: r.text(),
        },
    }
}

fn random_float(r: &mut Rng) -> f32 {
    let x = f32::from_bits(r.next() as u32);
    if x.is_nan() {
        f32::NAN
    } else {
        x
    }
}

fn random_attr(r: &mut Rng, name: String, outer: &[String], depth: usize) -> Attribute {
    let value = match r.below(if depth > 1 { 12 } else { 14 }) {
        0 => AttrValue::Float(random_float(r)),
        1 => AttrValue::Int(r.next() as i64),
        2 => AttrValue::String((0..r.below(6)).map(|_| r.next() as u8).collect()),
        3 => AttrValue::Tensor(random_tensor(r)),
        4 => AttrValue::Type(random_type(r, 0)),
        5 => AttrValue::Floats((0..r.below(4)).map(|_| random_float(r)).collect()),
        6 => AttrValue::Ints((0..r.below(4)).map(|_| r.next() as i64).collect()),
        7 => AttrValue::Strings((0..r.below(3)).map(|_| r.text().into_bytes()).collect()),
        8 => AttrValue::Tensors((0..r.below(3)).map(|_| random_tensor(r)).collect()),
        9 => AttrValue::Types((0..r.below(3)).map(|_| random_type(r, 0)).collect()),
        10 => AttrValue::Int(-1),
        11 => AttrValue::Floats(vec![]),
        12 => AttrValue::Graph(Box::new(random_graph(r, outer, depth + 1))),
        _ => AttrValue::Graphs(
            (0..r.below(3))
                .map(|_| random_graph(r, outer, depth + 1))
                .collect(),
        ),
    };
    let doc = if r.chance(10) {
        r.text()
    } else {
        String::new()
    };
    Attribute { name, value, doc }
}

/// A random graph; `outer` holds names of enclosing graphs' values it may capture.
fn random_graph(r: &mut Rng, outer: &[String], depth: usize) -> Graph {
    let mut g = Graph::new(r.name("g"));
    if r.chance(20) {
        g.doc = r.text();
    }
    if r.chance(20) {
        g.meta.push((r.text(), r.text()));
    }
    let mut values: Vec<ValueId> = Vec::new();
    let mut inputs = Vec::new();
    for _ in 0..r.below(3) {
        let name = g.unique_value_name(&r.name("in"));
        let ty = if r.chance(80) {
            Some(random_type(r, 0))
        } else {
            None
        };
        let v = if r.chance(15) {
            g.add_initializer(name, random_tensor(r)).unwrap()
        } else {
            g.add_value(name, ty).unwrap()
        };
        inputs.push(v);
        values.push(v);
    }
    g.set_inputs(inputs).unwrap();
    for _ in 0..r.below(4) {
        let name = g.unique_value_name(&r.name("w"));
        let v = g.add_initializer(name, random_tensor(r)).unwrap();
        if r.chance(20) {
            let init = g.initializer_mut(v).unwrap().unwrap();
            init.doc = r.text();
            init.meta.push((r.text(), r.text()));
        }
        values.push(v);
    }
    if !outer.is_empty() && r.chance(60) {
        let name = outer[r.below(outer.len())].clone();
        if g.value_by_name(&name).is_none() {
            values.push(g.add_captured(name).unwrap());
        }
    }
    let mut scope: Vec<String> = outer.to_vec();
    for _ in 0..r.below(5) {
        let ins: Vec<Option<ValueId>> = (0..r.below(4))
            .map(|_| {
                if values.is_empty() || r.chance(10) {
                    None
                } else {
                    Some(values[r.below(values.len())])
                }
            })
            .collect();
        // A subgraph may capture what exists before its node, not the node's
        // own outputs (that would be a cycle).
        scope.extend(g.value_ids().iter().map(|&v| g.value(v).name().to_string()));
        let mut outs = Vec::new();
        for _ in 0..1 + r.below(2) {
            if r.chance(10) {
                outs.push(None);
            } else {
                let name = g.unique_value_name(&r.name("t"));
                let ty = if r.chance(50) {
                    Some(random_type(r, 0))
                } else {
                    None
                };
                outs.push(Some(g.add_value(name, ty).unwrap()));
            }
        }
        let n_attrs = r.below(4);
        let mut attrs: Vec<Attribute> = Vec::new();
        for i in 0..n_attrs {
            let name = format!("a{i}{}", r.text());
            attrs.push(random_attr(r, name, &scope, depth));
        }
        let ops = ["Conv", "Relu", "If", "Loop", "Custom"];
        let domains = ["", "", "com.acme", "ai.onnx"];
        let name = if r.chance(70) {
            g.unique_node_name(&r.name("n"))
        } else {
            String::new()
        };
        let node = NewNode {
            name,
            op_type: ops[r.below(ops.len())].to_string(),
            domain: domains[r.below(domains.len())].to_string(),
            overload: if r.chance(5) { r.text() } else { String::new() },
            inputs: ins,
            outputs: outs.clone(),
            attrs,
            doc: if r.chance(10) {
                r.text()
            } else {
                String::new()
            },
            meta: if r.chance(10) {
                vec![(r.text(), r.text())]
            } else {
                vec![]
            },
        };
        g.add_node(node).unwrap();
        values.extend(outs.into_iter().flatten());
    }
    let outputs: Vec<ValueId> = if values.is_empty() {
        vec![]
    } else {
        (0..1 + r.below(2))
            .map(|_| values[r.below(values.len())])
            .collect()
    };
    let mut dedup = outputs.clone();
    dedup.dedup();
    g.set_outputs(dedup).unwrap();
    for &v in &values {
        if r.chance(10) && !g.value(v).is_captured() {
            let val = g.value_mut(v).unwrap();
            val.doc = r.text();
            val.meta.push((r.text(), r.text()));
        }
    }
    if r.chance(10) {
        g.quantization_annotations
            .push(qgraph_ir::TensorAnnotation {
                tensor: r.text(),
                entries: vec![(r.text(), r.text())],
            });
    }
    // Drop values nothing uses, as a verified graph has none.
    for v in g.value_ids() {
        let val = g.value(v);
        if !g.is_used(v)
            && g.producer(v).is_none()
            && !val.is_graph_input()
            && val.initializer().is_none()
        {
            g.remove_value(v).unwrap();
        }
    }
    g
}

pub fn random_model(seed: u64) -> Model {
    let mut r = Rng(seed | 1);
    let graph = random_graph(&mut r, &[], 0);
    let mut m = Model::new(graph, 13 + r.below(10) as i64);
    m.ir_version = 3 + r.below(9) as i64;
    m.opset_imports.push(OpsetImport {
        domain: "com.acme".into(),
        version: 1,
    });
    m.producer_name = r.text();
    m.producer_version = r.text();
    m.model_version = r.below(3) as i64;
    if r.chance(30) {
        m.doc = r.text();
        m.meta.push((r.text(), r.text()));
    }
    if r.chance(30) {
        let mut body = Graph::new("Square");
        let a = body.add_input("a", None).unwrap();
        let c = body.add_value("c", Some(random_type(&mut r, 0))).unwrap();
        body.add_node(NewNode::new("Mul").inputs([a, a]).outputs([c]).attr(
            "alpha",
            AttrValue::Ref {
                name: "k".into(),
                kind: AttrKind::Float,
            },
        ))
        .unwrap();
        body.set_outputs(vec![c]).unwrap();
        m.functions.push(Function {
            name: "Square".into(),
            domain: "com.acme".into(),
            overload: String::new(),
            attributes: vec!["k".into()],
            attribute_defaults: vec![Attribute {
                name: "j".into(),
                value: AttrValue::Int(2),
                doc: String::new(),
            }],
            opset_imports: vec![OpsetImport {
                domain: String::new(),
                version: 18,
            }],
            doc: r.text(),
            meta: vec![],
            body,
        });
    }
    m
}

proptest! {
    // 256 cases by default; PROPTEST_CASES=N runs more.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn onnx_write_then_read_gives_the_same_model(seed in any::<u64>()) {
        let m = random_model(seed);
        qgraph_ir::verify_model(&m).unwrap();
        let bytes = qgraph_onnx::encode_model(&m).unwrap();
        prop_assert_eq!(&bytes, &qgraph_onnx::encode_model(&m).unwrap());
        let back = qgraph_onnx::decode_model(&bytes).unwrap();
        prop_assert!(back.model == m, "differs after ONNX round trip:\n{}\n---\n{}",
            print_model(&m, &PrintOptions::with_all_data()), print_model(&back.model, &PrintOptions::with_all_data()));
    }

    #[test]
    fn text_print_parse_print_is_identical(seed in any::<u64>()) {
        let m = random_model(seed);
        for opts in [PrintOptions::default(), PrintOptions::with_all_data()] {
            let text = print_model(&m, &opts);
            let parsed = parse_model(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(&print_model(&parsed, &opts), &text);
        }
        let full = print_model(&m, &PrintOptions::with_all_data());
        let back = parse_model(&full).unwrap();
        prop_assert!(back == m, "parse(print(m)) != m:\n{}\n---\n{:#?}\n---\n{:#?}", full, m, back);
    }

    #[test]
    fn mutated_onnx_bytes_never_panic(seed in any::<u64>(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cut in any::<prop::sample::Index>()) {
        let bytes = qgraph_onnx::encode_model(&random_model(seed)).unwrap();
        let mut bad = bytes.clone();
        for (i, b) in flips {
            let i = i.index(bad.len());
            bad[i] ^= b;
        }
        let _ = qgraph_onnx::decode_model(&bad);
        let _ = qgraph_onnx::decode_model(&bytes[..cut.index(bytes.len())]);
    }

    #[test]
    fn mutated_text_never_panics(seed in any::<u64>(), at in any::<prop::sample::Index>(), junk in "[ -~\\n]{0,12}") {
        let text = print_model(&random_model(seed), &PrintOptions::default());
        let mut cut = at.index(text.len() + 1);
        while !text.is_char_boundary(cut) { cut -= 1; }
        let _ = parse_model(&format!("{}{}{}", &text[..cut], junk, &text[cut..]));
        let _ = parse_model(&text[..cut]);
    }
}

#[test]
fn zz_debug_one() {
    let Ok(seed) = std::env::var("QG_SEED") else {
        return;
    };
    let m = random_model(seed.parse().unwrap());
    let full = print_model(&m, &PrintOptions::with_all_data());
    let back = parse_model(&full).unwrap();
    let (a, b) = (&m.graph, &back.graph);
    eprintln!("graph eq {}", a == b);
    eprintln!(
        "names {} {} doc {} meta {} q {}",
        a.name == b.name,
        a.value_count() == b.value_count(),
        a.doc == b.doc,
        a.meta == b.meta,
        a.quantization_annotations == b.quantization_annotations
    );
    for v in a.value_ids() {
        let x = a.value(v);
        let w = b.value_by_name(x.name()).unwrap();
        let y = b.value(w);
        if x.ty != y.ty
            || x.doc != y.doc
            || x.meta != y.meta
            || x.initializer() != y.initializer()
            || x.is_captured() != y.is_captured()
        {
            eprintln!(
                "value {:?}: {:?} vs {:?} / init {:?} vs {:?}",
                x.name(),
                x.ty,
                y.ty,
                x.initializer().is_some(),
                y.initializer().is_some()
            );
        }
    }
    eprintln!("functions eq {}", m.functions == back.functions);
    for (f, g) in m.functions.iter().zip(&back.functions) {
        eprintln!(
            "name {} dom {} ov {} attrs {} defs {} ops {} doc {:?}/{:?} meta {} body {}",
            f.name == g.name,
            f.domain == g.domain,
            f.overload == g.overload,
            f.attributes == g.attributes,
            f.attribute_defaults == g.attribute_defaults,
            f.opset_imports == g.opset_imports,
            f.doc,
            g.doc,
            f.meta == g.meta,
            f.body == g.body
        );
    }
    eprintln!("{full}");
}
