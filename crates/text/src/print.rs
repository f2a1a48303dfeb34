//! The printer. Output is deterministic and canonical: printing what the
//! parser read from a printed model gives the same text again.

use crate::syntax::{digest, is_word, value_ref, KEYWORDS};
use qgraph_ir::quote::{ident_or_quoted, quote, quote_bytes};
use qgraph_ir::{
    AttrValue, Attribute, Function, Graph, Metadata, Model, NodeId, Tensor, ValueId, ValueType,
};
use std::fmt::Write;

/// How to print.
#[derive(Clone, Copy, Debug)]
pub struct PrintOptions {
    /// Tensors with more elements than this are shown by type, shape and a
    /// content digest instead of their values. `usize::MAX` shows all data.
    pub inline_limit: usize,
}

impl Default for PrintOptions {
    fn default() -> PrintOptions {
        PrintOptions { inline_limit: 16 }
    }
}

impl PrintOptions {
    pub fn with_all_data() -> PrintOptions {
        PrintOptions {
            inline_limit: usize::MAX,
        }
    }
}

/// Prints a whole model.
pub fn print_model(model: &Model, options: &PrintOptions) -> String {
    let mut p = Printer {
        out: String::new(),
        options: *options,
    };
    p.model(model);
    p.out
}

/// One node as its statement, without indentation (subgraphs span lines).
pub fn format_node(graph: &Graph, node: NodeId, options: &PrintOptions) -> String {
    let mut p = Printer {
        out: String::new(),
        options: *options,
    };
    p.node(graph, node, 0, &[]);
    p.out.trim_end().to_string()
}

/// A tensor literal: `f32[2] [1.0, 2.0]` or `f32[64,3,3,3] <blake3:...>`.
pub fn format_tensor(tensor: &Tensor, options: &PrintOptions) -> String {
    let mut p = Printer {
        out: String::new(),
        options: *options,
    };
    p.tensor(tensor, 0);
    p.out
}

/// An attribute value as the text form writes it.
pub fn format_attr_value(value: &AttrValue, options: &PrintOptions) -> String {
    let mut p = Printer {
        out: String::new(),
        options: *options,
    };
    p.attr_value(value, 0);
    p.out
}

/// A node label, quoted when it is not a plain word or could read as a keyword.
pub fn format_label(name: &str) -> String {
    if is_word(name) && !KEYWORDS.contains(&name) {
        name.to_string()
    } else {
        quote(name)
    }
}

/// An operator as written in a node statement: `Conv`, `com.microsoft.QLinearConv`.
pub fn format_op(domain: &str, op_type: &str) -> String {
    let plain_op = qgraph_ir::quote::is_plain_identifier(op_type);
    if domain.is_empty() && plain_op {
        return op_type.to_string();
    }
    let plain_domain =
        !domain.is_empty() && domain.split('.').all(qgraph_ir::quote::is_plain_identifier);
    if plain_domain && plain_op {
        format!("{domain}.{op_type}")
    } else {
        format!("op({}, {})", quote(domain), quote(op_type))
    }
}

struct Printer {
    out: String,
    options: PrintOptions,
}

fn pad(indent: usize) -> String {
    " ".repeat(indent)
}

/// A float as the text form writes it: the shortest text that reads back to
/// the same value, and `nan`, `inf`, `-inf`.
fn float_text<F: Into<f64> + std::fmt::Debug + Copy>(x: F) -> String {
    let v: f64 = x.into();
    if v.is_nan() {
        "nan".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        }
    } else {
        format!("{x:?}")
    }
}

fn f32_text(x: f32) -> String {
    float_text(x)
}

impl Printer {
    /// A tensor literal rendered on its own (for building a line).
    fn tensor_text(&self, t: &Tensor, indent: usize) -> String {
        let mut p = Printer {
            out: String::new(),
            options: self.options,
        };
        p.tensor(t, indent);
        p.out
    }

    /// `KEYWORD %name[: type] = TENSOR`, then the tensor's doc and metadata.
    fn data_statement(
        &mut self,
        keyword: &str,
        val: &qgraph_ir::Value,
        init: &qgraph_ir::Initializer,
        indent: usize,
    ) {
        let mut text = format!("{keyword} {}", value_ref(val.name()));
        if let Some(t) = &val.ty {
            let _ = write!(text, ": {t}");
        }
        let _ = write!(text, " = {}", self.tensor_text(&init.tensor, indent));
        self.line(indent, &text);
        self.doc_line(indent + 2, &init.doc);
        self.meta_lines(indent + 2, &init.meta);
    }

    fn line(&mut self, indent: usize, text: &str) {
        self.out.push_str(&pad(indent));
        self.out.push_str(text);
        self.out.push('\n');
    }

    fn meta_lines(&mut self, indent: usize, meta: &Metadata) {
        for (k, v) in meta {
            self.line(indent, &format!("meta {} = {}", quote(k), quote(v)));
        }
    }

    fn doc_line(&mut self, indent: usize, doc: &str) {
        if !doc.is_empty() {
            self.line(indent, &format!("doc {}", quote(doc)));
        }
    }

    fn model(&mut self, m: &Model) {
        self.line(0, &format!("ir_version {}", m.ir_version));
        for o in &m.opset_imports {
            self.line(0, &format!("opset {} {}", quote(&o.domain), o.version));
        }
        if !m.producer_name.is_empty() || !m.producer_version.is_empty() {
            self.line(
                0,
                &format!(
                    "producer {} {}",
                    quote(&m.producer_name),
                    quote(&m.producer_version)
                ),
            );
        }
        if !m.domain.is_empty() {
            self.line(0, &format!("domain {}", quote(&m.domain)));
        }
        if m.model_version != 0 {
            self.line(0, &format!("model_version {}", m.model_version));
        }
        self.doc_line(0, &m.doc);
        self.meta_lines(0, &m.meta);
        self.out.push('\n');
        self.graph(&m.graph, 0, &[]);
        for f in &m.functions {
            self.out.push('\n');
            self.function(f);
        }
    }

    fn function(&mut self, f: &Function) {
        self.line(
            0,
            &format!(
                "function {} {} {{",
                quote(&f.domain),
                ident_or_quoted(&f.name)
            ),
        );
        self.doc_line(2, &f.doc);
        self.meta_lines(2, &f.meta);
        if !f.overload.is_empty() {
            self.line(2, &format!("overload {}", quote(&f.overload)));
        }
        for a in &f.attributes {
            self.line(2, &format!("attribute {}", ident_or_quoted(a)));
        }
        for a in &f.attribute_defaults {
            let mut text = format!("attribute {} = ", ident_or_quoted(&a.name));
            let mut p = Printer {
                out: String::new(),
                options: self.options,
            };
            p.attr_value(&a.value, 2);
            text.push_str(&p.out);
            if !a.doc.is_empty() {
                let _ = write!(text, " doc {}", quote(&a.doc));
            }
            self.line(2, &text);
        }
        for o in &f.opset_imports {
            self.line(2, &format!("opset {} {}", quote(&o.domain), o.version));
        }
        self.graph_body(&f.body, 2, "", &Metadata::new(), &[]);
        self.line(0, "}");
    }

    /// `graph NAME {` ... `}`; `outer` lists the enclosing graphs.
    fn graph(&mut self, g: &Graph, indent: usize, outer: &[&Graph]) {
        self.out.push_str(&pad(indent));
        self.graph_inline(g, indent, outer);
        self.out.push('\n');
    }

    /// The graph block starting at the current position (no leading pad, no
    /// trailing newline), for use inside attribute values.
    fn graph_inline(&mut self, g: &Graph, indent: usize, outer: &[&Graph]) {
        let _ = writeln!(self.out, "graph {} {{", ident_or_quoted(&g.name));
        self.graph_body(g, indent + 2, &g.doc, &g.meta, outer);
        self.out.push_str(&pad(indent));
        self.out.push('}');
    }

    fn graph_body(
        &mut self,
        g: &Graph,
        indent: usize,
        doc: &str,
        meta: &Metadata,
        outer: &[&Graph],
    ) {
        self.doc_line(indent, doc);
        self.meta_lines(indent, meta);
        for &v in g.inputs() {
            let val = g.value(v);
            match val.initializer() {
                Some(init) => self.data_statement("input", val, init, indent),
                None => {
                    let mut text = format!("input {}", value_ref(val.name()));
                    if let Some(t) = &val.ty {
                        let _ = write!(text, ": {t}");
                    }
                    self.line(indent, &text);
                }
            }
        }
        for &v in g.outputs() {
            let val = g.value(v);
            let mut text = format!("output {}", value_ref(val.name()));
            // The type goes here unless the input or init statement has it.
            if let (Some(t), false, None) = (&val.ty, val.is_graph_input(), val.initializer()) {
                let _ = write!(text, ": {t}");
            }
            self.line(indent, &text);
        }
        for v in g.value_ids() {
            if g.value(v).is_captured() {
                self.line(indent, &format!("outer {}", value_ref(g.value(v).name())));
            }
        }
        for v in g.initializers() {
            let val = g.value(v);
            if let (Some(init), false) = (val.initializer(), val.is_graph_input()) {
                self.data_statement("init", val, init, indent);
            }
        }
        let order = g.topo_order().unwrap_or_else(|_| g.node_ids());
        let mut inner: Vec<&Graph> = outer.to_vec();
        inner.push(g);
        for &n in &order {
            self.node(g, n, indent, &inner);
        }
        for v in annotated_values(g, &order) {
            let val = g.value(v);
            self.line(indent, &format!("value {}", value_ref(val.name())));
            self.doc_line(indent + 2, &val.doc);
            self.meta_lines(indent + 2, &val.meta);
        }
        for a in &g.quantization_annotations {
            let entries: Vec<String> = a
                .entries
                .iter()
                .map(|(k, v)| format!("{} = {}", quote(k), quote(v)))
                .collect();
            self.line(
                indent,
                &format!("quant {} {{{}}}", quote(&a.tensor), entries.join(", ")),
            );
        }
    }

    fn node(&mut self, g: &Graph, n: NodeId, indent: usize, inner: &[&Graph]) {
        let node = g.node(n);
        let mut text = String::new();
        if !node.name().is_empty() {
            let _ = write!(text, "{}: ", format_label(node.name()));
        }
        let outs: Vec<String> = node
            .outputs()
            .iter()
            .map(|o| match o {
                None => "_".to_string(),
                Some(v) => {
                    let val = g.value(*v);
                    match (&val.ty, val.is_graph_output()) {
                        (Some(t), false) => format!("{}: {t}", value_ref(val.name())),
                        _ => value_ref(val.name()),
                    }
                }
            })
            .collect();
        if !outs.is_empty() {
            let _ = write!(text, "{} = ", outs.join(", "));
        }
        let ins: Vec<String> = node
            .inputs()
            .iter()
            .map(|i| match i {
                None => "_".to_string(),
                Some(v) => value_ref(g.value(*v).name()),
            })
            .collect();
        let _ = write!(
            text,
            "{}({})",
            format_op(&node.domain, &node.op_type),
            ins.join(", ")
        );
        self.out.push_str(&pad(indent));
        self.out.push_str(&text);
        if !node.attrs.is_empty() {
            self.out.push_str(" {");
            for (i, a) in node.attrs.iter().enumerate() {
                if i > 0 {
                    self.out.push_str(", ");
                }
                self.attribute(a, indent, inner);
            }
            self.out.push('}');
        }
        self.out.push('\n');
        if !node.overload.is_empty() {
            self.line(indent + 2, &format!("overload {}", quote(&node.overload)));
        }
        self.doc_line(indent + 2, &node.doc);
        self.meta_lines(indent + 2, &node.meta);
    }

    fn attribute(&mut self, a: &Attribute, indent: usize, inner: &[&Graph]) {
        let _ = write!(self.out, "{} = ", ident_or_quoted(&a.name));
        self.attr_value_in(&a.value, indent, inner);
        if !a.doc.is_empty() {
            let _ = write!(self.out, " doc {}", quote(&a.doc));
        }
    }

    fn attr_value(&mut self, v: &AttrValue, indent: usize) {
        self.attr_value_in(v, indent, &[]);
    }

    fn attr_value_in(&mut self, v: &AttrValue, indent: usize, inner: &[&Graph]) {
        let list = |p: &mut Printer, kind: &str, items: Vec<String>| {
            if items.is_empty() {
                let _ = write!(p.out, "{kind} []");
            } else {
                let _ = write!(p.out, "[{}]", items.join(", "));
            }
        };
        match v {
            AttrValue::Float(f) => self.out.push_str(&f32_text(*f)),
            AttrValue::Int(i) => {
                let _ = write!(self.out, "{i}");
            }
            AttrValue::String(s) => self.out.push_str(&quote_bytes(s)),
            AttrValue::Tensor(t) => self.tensor(t, indent),
            AttrValue::Graph(g) => self.graph_inline(g, indent + 2, inner),
            AttrValue::Type(t) => {
                let _ = write!(self.out, "type({t})");
            }
            AttrValue::Floats(fs) => {
                list(self, "floats", fs.iter().map(|&f| f32_text(f)).collect())
            }
            AttrValue::Ints(is) => list(self, "ints", is.iter().map(|i| i.to_string()).collect()),
            AttrValue::Strings(ss) => {
                list(self, "strings", ss.iter().map(|s| quote_bytes(s)).collect())
            }
            AttrValue::Types(ts) => list(
                self,
                "types",
                ts.iter().map(|t| format!("type({t})")).collect(),
            ),
            AttrValue::Tensors(ts) => {
                let items = ts.iter().map(|t| self.tensor_text(t, indent)).collect();
                list(self, "tensors", items);
            }
            AttrValue::Graphs(gs) => {
                if gs.is_empty() {
                    self.out.push_str("graphs []");
                } else {
                    self.out.push('[');
                    for (i, g) in gs.iter().enumerate() {
                        if i > 0 {
                            self.out.push_str(", ");
                        }
                        self.graph_inline(g, indent + 2, inner);
                    }
                    self.out.push(']');
                }
            }
            AttrValue::Ref { name, kind } => {
                let _ = write!(self.out, "ref({}, {})", kind.name(), ident_or_quoted(name));
            }
        }
    }

    fn tensor(&mut self, t: &Tensor, indent: usize) {
        let _ = write!(self.out, "{}{} ", t.dtype(), qgraph_ir::ShapeFmt(t.shape()));
        if let Tensor::Elided(e) = t {
            let _ = write!(self.out, "<blake3:{}>", e.digest);
            return;
        }
        if t.len() > self.options.inline_limit {
            let _ = write!(self.out, "<blake3:{}>", digest(t));
            return;
        }
        let items: Vec<String> = match t {
            Tensor::F32(a) => a.iter().map(|&x| f32_text(x)).collect(),
            Tensor::F64(a) => a.iter().map(|&x| float_text(x)).collect(),
            Tensor::F16(a) => a.iter().map(|x| f32_text(x.to_f32())).collect(),
            Tensor::BF16(a) => a.iter().map(|x| f32_text(x.to_f32())).collect(),
            Tensor::I8(a) => a.iter().map(|x| x.to_string()).collect(),
            Tensor::I16(a) => a.iter().map(|x| x.to_string()).collect(),
            Tensor::I32(a) => a.iter().map(|x| x.to_string()).collect(),
            Tensor::I64(a) => a.iter().map(|x| x.to_string()).collect(),
            Tensor::U8(a) => a.iter().map(|x| x.to_string()).collect(),
            Tensor::U16(a) => a.iter().map(|x| x.to_string()).collect(),
            Tensor::U32(a) => a.iter().map(|x| x.to_string()).collect(),
            Tensor::U64(a) => a.iter().map(|x| x.to_string()).collect(),
            Tensor::Bool(a) => a.iter().map(|x| x.to_string()).collect(),
            Tensor::String(a) => a.iter().map(|s| quote_bytes(s)).collect(),
            Tensor::Packed(p) => match p.unpack_sub_byte_ints() {
                Some(v) => v.iter().map(|x| x.to_string()).collect(),
                None => {
                    let hex: String = p.bytes().iter().map(|b| format!("{b:02x}")).collect();
                    let _ = write!(self.out, "raw \"{hex}\"");
                    return;
                }
            },
            Tensor::Elided(_) => unreachable!("handled above"),
        };
        // Long inline data wraps every 16 values.
        self.out.push('[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                if i % 16 == 0 {
                    self.out.push_str(",\n");
                    self.out.push_str(&pad(indent + 4));
                } else {
                    self.out.push_str(", ");
                }
            }
            self.out.push_str(item);
        }
        self.out.push(']');
    }
}

/// Values with their own doc or metadata, in print order: inputs, captured
/// values, initializers, then node outputs in node order.
fn annotated_values(g: &Graph, order: &[NodeId]) -> Vec<ValueId> {
    let mut seq: Vec<ValueId> = g.inputs().to_vec();
    seq.extend(
        g.value_ids()
            .into_iter()
            .filter(|&v| g.value(v).is_captured()),
    );
    seq.extend(
        g.initializers()
            .into_iter()
            .filter(|&v| !g.value(v).is_graph_input()),
    );
    for &n in order {
        seq.extend(g.node(n).outputs().iter().flatten().copied());
    }
    // Graph outputs that nothing above defines cannot occur in a verified
    // graph; keep the list complete for unverified ones anyway.
    seq.extend(g.outputs().iter().copied());
    let mut seen = std::collections::HashSet::new();
    seq.into_iter()
        .filter(|v| seen.insert(*v))
        .filter(|&v| !g.value(v).doc.is_empty() || !g.value(v).meta.is_empty())
        .collect()
}

/// The declared type of a value, for messages and diffs.
pub fn format_type(t: &ValueType) -> String {
    t.to_string()
}
