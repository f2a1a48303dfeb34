//! A structural diff of two models, for people reading CI logs: nodes added,
//! removed and changed (inputs, attributes, docs), initializers added, removed
//! and changed with their largest absolute difference, header, type and
//! metadata changes. Subgraphs and functions are compared recursively.
//!
//! Nodes are matched by name; unnamed nodes by the name of their first output.

use qgraph_ir::{AttrValue, Attribute, Graph, Metadata, Model, NodeId, Tensor, ValueId};
use qgraph_text::{format_attr_value, format_node, format_tensor, value_ref, PrintOptions};
use std::collections::{HashMap, HashSet};
use std::fmt::Write;

/// Counts of what changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub nodes_added: usize,
    pub nodes_removed: usize,
    pub nodes_changed: usize,
    pub inits_added: usize,
    pub inits_removed: usize,
    pub inits_changed: usize,
    pub other: usize,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.nodes_added += other.nodes_added;
        self.nodes_removed += other.nodes_removed;
        self.nodes_changed += other.nodes_changed;
        self.inits_added += other.inits_added;
        self.inits_removed += other.inits_removed;
        self.inits_changed += other.inits_changed;
        self.other += other.other;
    }
}

/// The differences, as readable lines.
#[derive(Clone, Debug, Default)]
pub struct ModelDiff {
    pub lines: Vec<String>,
    pub counts: Counts,
}

impl ModelDiff {
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The report: a header naming both sides, the lines, and a summary.
    pub fn render(&self, a: &str, b: &str) -> String {
        let mut out = format!("--- {a}\n+++ {b}\n");
        for l in &self.lines {
            out.push_str(l);
            out.push('\n');
        }
        let c = &self.counts;
        let _ = writeln!(
            out,
            "summary: nodes {} added, {} removed, {} changed; initializers {} added, {} removed, {} changed; {} other changes",
            c.nodes_added, c.nodes_removed, c.nodes_changed, c.inits_added, c.inits_removed, c.inits_changed, c.other
        );
        out
    }
}

/// Compares two models.
pub fn diff_models(a: &Model, b: &Model) -> ModelDiff {
    let mut d = Differ {
        out: ModelDiff::default(),
        opts: PrintOptions::default(),
    };
    d.model(a, b);
    d.out
}

struct Differ {
    out: ModelDiff,
    opts: PrintOptions,
}

fn q(s: &str) -> String {
    qgraph_ir::quote::quote(s)
}

fn ty_text(g: &Graph, v: ValueId) -> String {
    match g.value(v).effective_type() {
        Some(t) => format!(": {t}"),
        None => String::new(),
    }
}

/// Largest absolute difference and count of differing elements between two
/// tensors of one type and shape; `None` when values cannot be compared.
fn value_change(a: &Tensor, b: &Tensor) -> Option<(f64, usize)> {
    let (x, y) = (a.to_f64_vec()?, b.to_f64_vec()?);
    let mut max = 0.0f64;
    let mut count = 0;
    for (p, r) in x.iter().zip(&y) {
        if p.to_bits() != r.to_bits() {
            count += 1;
            let d = if p.is_nan() || r.is_nan() {
                f64::INFINITY
            } else {
                (p - r).abs()
            };
            max = max.max(d);
        }
    }
    Some((max, count))
}

fn tensor_change(a: &Tensor, b: &Tensor) -> Option<String> {
    if a == b {
        return None;
    }
    // A snapshot keeps only the digest of a large tensor: compare digests
    // whenever one side has nothing else.
    if (a.is_elided() || b.is_elided())
        && a.dtype() == b.dtype()
        && a.shape() == b.shape()
        && qgraph_text::digest(a) == qgraph_text::digest(b)
    {
        return None;
    }
    if a.dtype() != b.dtype() || a.shape() != b.shape() {
        return Some(format!(
            "{}{} -> {}{}",
            a.dtype(),
            qgraph_ir::ShapeFmt(a.shape()),
            b.dtype(),
            qgraph_ir::ShapeFmt(b.shape())
        ));
    }
    let what = format!("{}{}", a.dtype(), qgraph_ir::ShapeFmt(a.shape()));
    Some(match value_change(a, b) {
        Some((max, n)) if n > 0 => format!(
            "{what}: {n} of {} values differ, max abs diff {max:.3e}",
            a.len()
        ),
        _ if a.is_elided() || b.is_elided() => format!(
            "{what}: digest {} -> {}",
            qgraph_text::digest(a),
            qgraph_text::digest(b)
        ),
        _ => format!("{what}: data differs"),
    })
}

fn meta_changes(a: &Metadata, b: &Metadata, indent: &str, what: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let bm: HashMap<&str, &str> = b.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let am: HashMap<&str, &str> = a.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    for (k, v) in a {
        match bm.get(k.as_str()) {
            None => lines.push(format!("{indent}- {what} {} = {}", q(k), q(v))),
            Some(w) if w != v => {
                lines.push(format!("{indent}~ {what} {}: {} -> {}", q(k), q(v), q(w)))
            }
            _ => {}
        }
    }
    for (k, v) in b {
        if !am.contains_key(k.as_str()) {
            lines.push(format!("{indent}+ {what} {} = {}", q(k), q(v)));
        }
    }
    lines
}

fn doc_change(a: &str, b: &str, indent: &str) -> Option<String> {
    (a != b).then(|| format!("{indent}~ doc {} -> {}", q(a), q(b)))
}

/// A node's identity across the two graphs.
fn node_key(g: &Graph, n: NodeId) -> String {
    let node = g.node(n);
    if !node.name().is_empty() {
        return format!("name:{}", node.name());
    }
    match node.outputs().iter().flatten().next() {
        Some(&o) => format!("output:{}", g.value(o).name()),
        None => format!("serial:{}", node.serial()),
    }
}

fn value_names(g: &Graph, vs: &[Option<ValueId>]) -> Vec<String> {
    vs.iter()
        .map(|v| match v {
            Some(v) => value_ref(g.value(*v).name()),
            None => "_".into(),
        })
        .collect()
}

fn list_changes(a: &[String], b: &[String], what: &str, indent: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for i in 0..a.len().max(b.len()) {
        match (a.get(i), b.get(i)) {
            (Some(x), Some(y)) if x != y => lines.push(format!("{indent}~ {what} {i}: {x} -> {y}")),
            (Some(x), None) => lines.push(format!("{indent}- {what} {i}: {x}")),
            (None, Some(y)) => lines.push(format!("{indent}+ {what} {i}: {y}")),
            _ => {}
        }
    }
    lines
}

impl Differ {
    fn push(&mut self, line: String) {
        self.out.lines.push(line);
    }

    fn other(&mut self, line: String) {
        self.out.counts.other += 1;
        self.push(line);
    }

    fn model(&mut self, a: &Model, b: &Model) {
        if a.ir_version != b.ir_version {
            self.other(format!("~ ir_version {} -> {}", a.ir_version, b.ir_version));
        }
        for o in &a.opset_imports {
            match b.opset_imports.iter().find(|p| p.domain == o.domain) {
                None => self.other(format!("- opset {} {}", q(&o.domain), o.version)),
                Some(p) if p.version != o.version => self.other(format!(
                    "~ opset {}: {} -> {}",
                    q(&o.domain),
                    o.version,
                    p.version
                )),
                _ => {}
            }
        }
        for p in &b.opset_imports {
            if !a.opset_imports.iter().any(|o| o.domain == p.domain) {
                self.other(format!("+ opset {} {}", q(&p.domain), p.version));
            }
        }
        if (&a.producer_name, &a.producer_version) != (&b.producer_name, &b.producer_version) {
            self.other(format!(
                "~ producer {} {} -> {} {}",
                q(&a.producer_name),
                q(&a.producer_version),
                q(&b.producer_name),
                q(&b.producer_version)
            ));
        }
        if a.domain != b.domain {
            self.other(format!("~ domain {} -> {}", q(&a.domain), q(&b.domain)));
        }
        if a.model_version != b.model_version {
            self.other(format!(
                "~ model_version {} -> {}",
                a.model_version, b.model_version
            ));
        }
        if let Some(l) = doc_change(&a.doc, &b.doc, "") {
            self.other(l);
        }
        for l in meta_changes(&a.meta, &b.meta, "", "meta") {
            self.other(l);
        }
        self.graph(&a.graph, &b.graph, "");
        self.functions(a, b);
    }

    fn functions(&mut self, a: &Model, b: &Model) {
        let key = |f: &qgraph_ir::Function| (f.domain.clone(), f.name.clone(), f.overload.clone());
        let bk: HashSet<_> = b.functions.iter().map(key).collect();
        let ak: HashSet<_> = a.functions.iter().map(key).collect();
        for f in &a.functions {
            match b.functions.iter().find(|g| key(g) == key(f)) {
                None => self.other(format!("- function {} {}", q(&f.domain), f.name)),
                Some(g) if g != f => {
                    let mut sub = Differ {
                        out: ModelDiff::default(),
                        opts: self.opts,
                    };
                    if (&f.attributes, &f.attribute_defaults, &f.opset_imports)
                        != (&g.attributes, &g.attribute_defaults, &g.opset_imports)
                    {
                        sub.push("    ~ attributes or opset imports changed".into());
                    }
                    if let Some(l) = doc_change(&f.doc, &g.doc, "    ") {
                        sub.push(l);
                    }
                    sub.graph(&f.body, &g.body, "    ");
                    // Bodies that differ only in stored form (digests) are equal.
                    if !sub.out.lines.is_empty() {
                        self.other(format!("~ function {} {}:", q(&f.domain), f.name));
                        self.out.lines.extend(sub.out.lines);
                        self.out.counts.add(&sub.out.counts);
                    }
                }
                _ => {}
            }
        }
        for g in &b.functions {
            if !ak.contains(&key(g)) {
                self.other(format!("+ function {} {}", q(&g.domain), g.name));
            }
        }
        let _ = bk;
    }

    fn graph(&mut self, a: &Graph, b: &Graph, indent: &str) {
        if a.name != b.name {
            self.other(format!(
                "{indent}~ graph name {} -> {}",
                q(&a.name),
                q(&b.name)
            ));
        }
        if let Some(l) = doc_change(&a.doc, &b.doc, indent) {
            self.other(l);
        }
        for l in meta_changes(&a.meta, &b.meta, indent, "graph meta") {
            self.other(l);
        }
        self.endpoints(a, b, a.inputs(), b.inputs(), "input", indent);
        self.endpoints(a, b, a.outputs(), b.outputs(), "output", indent);
        self.initializers(a, b, indent);
        self.nodes(a, b, indent);
        self.values(a, b, indent);
        if a.quantization_annotations != b.quantization_annotations {
            self.other(format!("{indent}~ quantization annotations changed"));
        }
    }

    fn endpoints(
        &mut self,
        a: &Graph,
        b: &Graph,
        xs: &[ValueId],
        ys: &[ValueId],
        what: &str,
        indent: &str,
    ) {
        let names = |g: &Graph, vs: &[ValueId]| -> Vec<String> {
            vs.iter().map(|&v| g.value(v).name().to_string()).collect()
        };
        let (an, bn) = (names(a, xs), names(b, ys));
        for (i, &v) in xs.iter().enumerate() {
            match ys.iter().find(|&&w| b.value(w).name() == an[i]) {
                None => self.other(format!(
                    "{indent}- {what} {}{}",
                    value_ref(&an[i]),
                    ty_text(a, v)
                )),
                Some(&w) => {
                    let (ta, tb) = (ty_text(a, v), ty_text(b, w));
                    if ta != tb {
                        self.other(format!(
                            "{indent}~ {what} {}{ta} ->{}",
                            value_ref(&an[i]),
                            tb.trim_start_matches(':')
                        ));
                    }
                }
            }
        }
        for (i, &w) in ys.iter().enumerate() {
            if !an.contains(&bn[i]) {
                self.other(format!(
                    "{indent}+ {what} {}{}",
                    value_ref(&bn[i]),
                    ty_text(b, w)
                ));
            }
        }
    }

    fn initializers(&mut self, a: &Graph, b: &Graph, indent: &str) {
        for v in a.initializers() {
            let name = a.value(v).name();
            let ia = a.initializer(v).expect("an initializer");
            match b.value_by_name(name).and_then(|w| b.initializer(w)) {
                None => {
                    self.out.counts.inits_removed += 1;
                    let line = format!(
                        "{indent}- init {} = {}",
                        value_ref(name),
                        format_tensor(&ia.tensor, &self.opts)
                    );
                    self.push(line);
                }
                Some(ib) => {
                    let mut changes = Vec::new();
                    if let Some(c) = tensor_change(&ia.tensor, &ib.tensor) {
                        changes.push(c);
                    }
                    if ia.doc != ib.doc || ia.meta != ib.meta {
                        changes.push("doc or metadata changed".into());
                    }
                    if !changes.is_empty() {
                        self.out.counts.inits_changed += 1;
                        self.push(format!(
                            "{indent}~ init {} {}",
                            value_ref(name),
                            changes.join("; ")
                        ));
                    }
                }
            }
        }
        for w in b.initializers() {
            let name = b.value(w).name();
            if a.value_by_name(name)
                .and_then(|v| a.initializer(v))
                .is_none()
            {
                self.out.counts.inits_added += 1;
                let ib = b.initializer(w).expect("an initializer");
                let line = format!(
                    "{indent}+ init {} = {}",
                    value_ref(name),
                    format_tensor(&ib.tensor, &self.opts)
                );
                self.push(line);
            }
        }
    }

    fn nodes(&mut self, a: &Graph, b: &Graph, indent: &str) {
        let order = |g: &Graph| g.topo_order().unwrap_or_else(|_| g.node_ids());
        let a_keys: HashMap<String, NodeId> =
            order(a).into_iter().map(|n| (node_key(a, n), n)).collect();
        let b_order = order(b);
        let b_keys: HashSet<String> = b_order.iter().map(|&n| node_key(b, n)).collect();
        for &m in &b_order {
            match a_keys.get(&node_key(b, m)) {
                None => {
                    self.out.counts.nodes_added += 1;
                    let text = format_node(b, m, &self.opts);
                    self.push(format!(
                        "{indent}+ {}",
                        text.replace('\n', &format!("\n{indent}  "))
                    ));
                }
                Some(&n) => {
                    let details = self.node_details(a, n, b, m, &format!("{indent}    "));
                    if !details.is_empty() {
                        self.out.counts.nodes_changed += 1;
                        self.push(format!("{indent}~ {}", b.describe_node(m)));
                        self.out.lines.extend(details);
                    }
                }
            }
        }
        for n in order(a) {
            if !b_keys.contains(&node_key(a, n)) {
                self.out.counts.nodes_removed += 1;
                let text = format_node(a, n, &self.opts);
                self.push(format!(
                    "{indent}- {}",
                    text.replace('\n', &format!("\n{indent}  "))
                ));
            }
        }
    }

    fn node_details(
        &mut self,
        a: &Graph,
        n: NodeId,
        b: &Graph,
        m: NodeId,
        indent: &str,
    ) -> Vec<String> {
        let (x, y) = (a.node(n), b.node(m));
        let mut lines = Vec::new();
        if (&x.domain, &x.op_type) != (&y.domain, &y.op_type) {
            lines.push(format!(
                "{indent}~ op {} -> {}",
                qgraph_text::format_op(&x.domain, &x.op_type),
                qgraph_text::format_op(&y.domain, &y.op_type)
            ));
        }
        if x.name() != y.name() {
            lines.push(format!("{indent}~ name {} -> {}", q(x.name()), q(y.name())));
        }
        lines.extend(list_changes(
            &value_names(a, x.inputs()),
            &value_names(b, y.inputs()),
            "input",
            indent,
        ));
        lines.extend(list_changes(
            &value_names(a, x.outputs()),
            &value_names(b, y.outputs()),
            "output",
            indent,
        ));
        for at in &x.attrs {
            match y.attrs.iter().find(|bt| bt.name == at.name) {
                None => lines.push(format!("{indent}- attr {}", self.attr_text(at))),
                // attr_change is empty when the two differ only in how
                // they are stored (values against a digest of the same).
                Some(bt) if bt != at => lines.extend(self.attr_change(at, bt, indent)),
                _ => {}
            }
        }
        for bt in &y.attrs {
            if !x.attrs.iter().any(|at| at.name == bt.name) {
                lines.push(format!("{indent}+ attr {}", self.attr_text(bt)));
            }
        }
        if x.overload != y.overload {
            lines.push(format!(
                "{indent}~ overload {} -> {}",
                q(&x.overload),
                q(&y.overload)
            ));
        }
        lines.extend(doc_change(&x.doc, &y.doc, indent));
        lines.extend(meta_changes(&x.meta, &y.meta, indent, "meta"));
        lines
    }

    fn attr_text(&self, a: &Attribute) -> String {
        let v = format_attr_value(&a.value, &self.opts);
        let first = v.lines().next().unwrap_or_default();
        let more = if v.lines().count() > 1 { " ..." } else { "" };
        format!("{} = {first}{more}", a.name)
    }

    fn attr_change(&mut self, a: &Attribute, b: &Attribute, indent: &str) -> Vec<String> {
        match (&a.value, &b.value) {
            (AttrValue::Tensor(x), AttrValue::Tensor(y)) => match tensor_change(x, y) {
                Some(c) => vec![format!("{indent}~ attr {}: {c}", a.name)],
                None if a.doc != b.doc => vec![format!("{indent}~ attr {}: doc changed", a.name)],
                None => Vec::new(),
            },
            (AttrValue::Graph(x), AttrValue::Graph(y)) => {
                let mut sub = Differ {
                    out: ModelDiff::default(),
                    opts: self.opts,
                };
                sub.graph(x, y, &format!("{indent}    "));
                if sub.out.lines.is_empty() && a.doc == b.doc {
                    return Vec::new();
                }
                let mut lines = vec![format!("{indent}~ attr {}: subgraph changed", a.name)];
                lines.extend(sub.out.lines);
                lines
            }
            _ => {
                let (x, y) = (
                    format_attr_value(&a.value, &self.opts),
                    format_attr_value(&b.value, &self.opts),
                );
                if x.contains('\n') || y.contains('\n') {
                    vec![format!("{indent}~ attr {} changed", a.name)]
                } else if x != y {
                    vec![format!("{indent}~ attr {}: {x} -> {y}", a.name)]
                } else if a.doc == b.doc {
                    // The same text: the same values, or the same digests.
                    Vec::new()
                } else {
                    vec![format!(
                        "{indent}~ attr {}: doc {} -> {}",
                        a.name,
                        q(&a.doc),
                        q(&b.doc)
                    )]
                }
            }
        }
    }

    /// Declared types, docs and metadata of values both graphs have.
    fn values(&mut self, a: &Graph, b: &Graph, indent: &str) {
        for v in a.value_ids() {
            let x = a.value(v);
            let Some(w) = b.value_by_name(x.name()) else {
                continue;
            };
            let y = b.value(w);
            let endpoint = x.is_graph_input()
                || x.is_graph_output()
                || y.is_graph_input()
                || y.is_graph_output();
            if x.ty != y.ty && !endpoint && (x.initializer().is_none() || y.initializer().is_none())
            {
                let show = |t: &Option<qgraph_ir::ValueType>| {
                    t.as_ref()
                        .map_or("(undeclared)".to_string(), |t| t.to_string())
                };
                self.other(format!(
                    "{indent}~ value {}: {} -> {}",
                    value_ref(x.name()),
                    show(&x.ty),
                    show(&y.ty)
                ));
            }
            if let Some(l) = doc_change(&x.doc, &y.doc, indent) {
                self.other(format!("{l} (value {})", value_ref(x.name())));
            }
            for l in meta_changes(
                &x.meta,
                &y.meta,
                indent,
                &format!("value {} meta", value_ref(x.name())),
            ) {
                self.other(l);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgraph_text::parse_model;

    const BASE: &str = r#"
ir_version 8
opset "" 13
graph g {
  input %x: f32[2]
  output %y: f32[2]
  init %w = f32[2] [1.0, 2.0]
  mul: %t = Mul(%x, %w)
  relu: %y = Relu(%t)
}
"#;

    #[test]
    fn equal_models_have_no_diff() {
        let a = parse_model(BASE).unwrap();
        assert!(diff_models(&a, &a.clone()).is_empty());
    }

    #[test]
    fn a_changed_model_reports_each_kind_of_change() {
        let a = parse_model(BASE).unwrap();
        let b = parse_model(
            r#"
ir_version 8
opset "" 13
meta "qgraph.scheme" = "int8"
graph g {
  input %x: f32[2]
  output %y: f32[2]
  init %w = f32[2] [1.0, 2.5]
  init %s = f32[] [0.1]
  mul: %t = Mul(%x, %w) {note = 1}
  scale: %u = Mul(%t, %s)
  relu: %y = LeakyRelu(%u)
}
"#,
        )
        .unwrap();
        let d = diff_models(&a, &b);
        let text = d.render("a.onnx", "b.onnx");
        assert_eq!(
            text,
            r#"--- a.onnx
+++ b.onnx
+ meta "qgraph.scheme" = "int8"
~ init %w f32[2]: 1 of 2 values differ, max abs diff 5.000e-1
+ init %s = f32[] [0.1]
~ node 'mul' (Mul)
    + attr note = 1
+ scale: %u = Mul(%t, %s)
~ node 'relu' (LeakyRelu)
    ~ op Relu -> LeakyRelu
    ~ input 0: %t -> %u
summary: nodes 1 added, 0 removed, 2 changed; initializers 1 added, 0 removed, 1 changed; 1 other changes
"#
        );
    }

    /// A model with large tensors everywhere a tensor can be: an
    /// initializer, a Constant's attribute and a subgraph's initializer.
    fn large_tensors(last: f32) -> String {
        let values = |last: f32| {
            let mut v: Vec<String> = (0..19).map(|i| format!("{i}.0")).collect();
            v.push(format!("{last:?}"));
            v.join(", ")
        };
        format!(
            r#"
ir_version 8
opset "" 13
graph g {{
  input %x: f32[20]
  input %c: bool[]
  output %y: f32[20]
  init %w = f32[20] [{w}]
  k: %k = Constant() {{value = f32[20] [{k}]}}
  mul: %t = Mul(%x, %w)
  add: %u = Add(%t, %k)
  branch: %y = If(%c) {{then_branch = graph then {{
    outer %u
    output %a: f32[20]
    init %s = f32[20] [{k}]
    then_add: %a = Add(%u, %s)
  }}, else_branch = graph other {{
    outer %u
    output %b: f32[20]
    else_id: %b = Identity(%u)
  }}}}
}}
"#,
            w = values(last),
            k = values(last),
        )
    }

    #[test]
    fn a_snapshot_with_digests_equals_the_model_it_was_printed_from() {
        let full = parse_model(&large_tensors(19.0)).unwrap();
        let snapshot_text = qgraph_text::print_model(&full, &PrintOptions::default());
        assert!(snapshot_text.contains("blake3"), "{snapshot_text}");
        let snapshot = parse_model(&snapshot_text).unwrap();
        assert!(
            diff_models(&snapshot, &full).is_empty(),
            "{:?}",
            diff_models(&snapshot, &full).lines
        );
        assert!(diff_models(&full, &snapshot).is_empty());
        // A changed value shows as changed digests, in each place.
        let changed = parse_model(&large_tensors(99.0)).unwrap();
        let d = diff_models(&snapshot, &changed);
        let text = d.lines.join("\n");
        assert_eq!(d.counts.inits_changed, 1, "{text}");
        assert!(text.contains("~ init %w f32[20]: digest"), "{text}");
        assert!(text.contains("~ attr value: f32[20]: digest"), "{text}");
        assert!(text.contains("subgraph changed"), "{text}");
    }
}
