//! ONNX protobuf -> IR.

use crate::codes::{attr_kind_from_code, dtype_from_code};
use crate::error::{invalid, unsupported, OnnxError};
use crate::proto;
use bytes::Bytes;
use prost::Message;
use qgraph_ir::{
    AttrKind, AttrValue, Attribute, DataType, Dim, Function, Graph, IrError, Metadata, Model,
    NewNode, OpsetImport, PackedTensor, TensorAnnotation, TensorType, ValueId, ValueType,
};
use qgraph_ir::{ShapeFmt, Tensor};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

/// A model read from a file, with what the reader had to say about it.
#[derive(Debug)]
pub struct Loaded {
    pub model: Model,
    /// Things present in the file that the IR does not keep.
    pub warnings: Vec<String>,
    /// Whether any tensor came from an external data file.
    pub used_external_data: bool,
}

/// Reads and verifies an `.onnx` file. External data files are looked up
/// next to it.
pub fn read_model(path: &Path) -> Result<Loaded, OnnxError> {
    let bytes = std::fs::read(path).map_err(|e| OnnxError::io(path, e))?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    decode_with_dir(Bytes::from(bytes), Some(&dir))
}

/// Decodes and verifies a model held in memory. A model whose tensors live
/// in external files cannot be decoded this way (there is no directory to
/// find them in).
pub fn decode_model(bytes: &[u8]) -> Result<Loaded, OnnxError> {
    decode_with_dir(Bytes::copy_from_slice(bytes), None)
}

fn decode_with_dir(bytes: Bytes, dir: Option<&Path>) -> Result<Loaded, OnnxError> {
    if bytes.is_empty() {
        return invalid("the file is empty");
    }
    let proto = proto::ModelProto::decode(bytes).map_err(|e| decode_error(&e))?;
    let mut reader = Reader {
        dir,
        warnings: Vec::new(),
        used_external_data: false,
        files: HashMap::new(),
    };
    let model = reader.model(proto).map_err(one_line)?;
    qgraph_ir::verify_model(&model).map_err(|e| one_line(OnnxError::Invalid(e.message)))?;
    Ok(Loaded {
        model,
        warnings: reader.warnings,
        used_external_data: reader.used_external_data,
    })
}

/// Error messages longer than this (the nodes and attributes around an error
/// many subgraphs deep, huge names) keep their first [`MESSAGE_HEAD`] and
/// last [`MESSAGE_TAIL`] characters, the outermost context and the cause.
const MESSAGE_LIMIT: usize = 256;
const MESSAGE_HEAD: usize = 140;
const MESSAGE_TAIL: usize = 90;

/// A protobuf decoding error in one line. prost names every enclosing field
/// from the innermost out, which for a deeply nested file runs to
/// kilobytes; past three, only the innermost and the outermost are named.
fn decode_error(e: &prost::DecodeError) -> OnnxError {
    // prost exposes the cause and the fields only through its message:
    // "failed to decode Protobuf message: Message.field: ...: cause".
    let text = e.to_string();
    let rest = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&text);
    let mut fields = Vec::new();
    let mut cause = rest;
    while let Some((field, tail)) = cause.split_once(": ") {
        if !is_field_path(field) {
            break;
        }
        fields.push(field);
        cause = tail;
    }
    if cause == "recursion limit reached" {
        let subgraphs = fields
            .iter()
            .filter(|f| matches!(**f, "AttributeProto.g" | "AttributeProto.graphs"))
            .count();
        // Decoding stops at the first level too deep: the file may nest
        // deeper still.
        return OnnxError::Unsupported(if subgraphs > 0 {
            format!(
                "subgraphs nested more than {} levels deep, deeper than protobuf decoding \
                 allows (prost's recursion limit of 100 nested messages)",
                subgraphs - 1
            )
        } else {
            "messages nested deeper than protobuf decoding allows (prost's recursion limit \
             of 100 nested messages)"
                .to_string()
        });
    }
    let mut path = if fields.len() <= 3 {
        fields.join(": ")
    } else {
        format!(
            "{}: ({} more): {}",
            fields[0],
            fields.len() - 2,
            fields[fields.len() - 1]
        )
    };
    if !path.is_empty() {
        path.push_str(": ");
    }
    one_line(OnnxError::Decode(format!(
        "protobuf decoding failed (failed to decode Protobuf message: {path}{cause}); \
         the file is truncated, corrupt, or not an ONNX model"
    )))
}

/// `Message.field`, as prost names a field in its errors (a field named
/// by a keyword is written `r#type`).
fn is_field_path(s: &str) -> bool {
    let ident = |p: &str| {
        let p = p.strip_prefix("r#").unwrap_or(p);
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    s.split_once('.').is_some_and(|(m, f)| ident(m) && ident(f))
}

/// An error's message on one line (control characters escaped) of at most
/// about [`MESSAGE_LIMIT`] characters (the middle cut out).
fn one_line(e: OnnxError) -> OnnxError {
    let fix = |m: String| -> String {
        let mut m = if m.chars().any(char::is_control) {
            let mut out = String::with_capacity(m.len());
            for c in m.chars() {
                if c.is_control() {
                    out.extend(c.escape_default());
                } else {
                    out.push(c);
                }
            }
            out
        } else {
            m
        };
        let n = m.chars().count();
        if n > MESSAGE_LIMIT {
            let head: String = m.chars().take(MESSAGE_HEAD).collect();
            let tail: String = m.chars().skip(n - MESSAGE_TAIL).collect();
            m = format!(
                "{head} [... {} characters ...] {tail}",
                n - MESSAGE_HEAD - MESSAGE_TAIL
            );
        }
        m
    };
    match e {
        OnnxError::Decode(m) => OnnxError::Decode(fix(m)),
        OnnxError::Invalid(m) => OnnxError::Invalid(fix(m)),
        OnnxError::Unsupported(m) => OnnxError::Unsupported(fix(m)),
        e @ OnnxError::Io { .. } => e,
    }
}

struct Reader<'a> {
    dir: Option<&'a Path>,
    warnings: Vec<String>,
    used_external_data: bool,
    files: HashMap<PathBuf, File>,
}

fn metadata(entries: Vec<proto::StringStringEntryProto>) -> Metadata {
    entries
        .into_iter()
        .map(|e| (e.key.unwrap_or_default(), e.value.unwrap_or_default()))
        .collect()
}

fn opsets(imports: Vec<proto::OperatorSetIdProto>) -> Vec<OpsetImport> {
    imports
        .into_iter()
        .map(|o| OpsetImport {
            domain: o.domain.unwrap_or_default(),
            version: o.version.unwrap_or_default(),
        })
        .collect()
}

fn ir_err(e: IrError) -> OnnxError {
    OnnxError::Invalid(e.to_string())
}

/// Names a graph defines itself: inputs, initializers and node outputs.
fn defined_names(g: &proto::GraphProto) -> HashSet<String> {
    let mut names: HashSet<String> = HashSet::new();
    names.extend(g.input.iter().filter_map(|v| v.name.clone()));
    names.extend(g.initializer.iter().filter_map(|t| t.name.clone()));
    names.extend(
        g.node
            .iter()
            .flat_map(|n| n.output.iter().cloned())
            .filter(|n| !n.is_empty()),
    );
    names
}

impl Reader<'_> {
    fn warn(&mut self, message: String) {
        if !self.warnings.contains(&message) {
            self.warnings.push(message);
        }
    }

    fn model(&mut self, m: proto::ModelProto) -> Result<Model, OnnxError> {
        let Some(ir_version) = m.ir_version.filter(|&v| v > 0) else {
            return invalid("the model has no ir_version; this is not an ONNX model");
        };
        let Some(graph) = m.graph else {
            return invalid("the model has no graph; this is not an ONNX model");
        };
        if m.opset_import.is_empty() {
            return invalid("the model imports no operator set (opset_import is empty)");
        }
        if !m.training_info.is_empty() {
            self.warn(format!(
                "dropped {} training_info entries (not kept by qgraph)",
                m.training_info.len()
            ));
        }
        if !m.configuration.is_empty() {
            self.warn("dropped the multi-device configurations (not kept by qgraph)".into());
        }
        let graph = self.graph(graph, &[])?;
        let mut functions = Vec::with_capacity(m.functions.len());
        for f in m.functions {
            let name = f.name.clone().unwrap_or_default();
            functions.push(
                self.function(f)
                    .map_err(|e| e.context(format!("function '{name}'")))?,
            );
        }
        Ok(Model {
            ir_version,
            opset_imports: opsets(m.opset_import),
            producer_name: m.producer_name.unwrap_or_default(),
            producer_version: m.producer_version.unwrap_or_default(),
            domain: m.domain.unwrap_or_default(),
            model_version: m.model_version.unwrap_or_default(),
            doc: m.doc_string.unwrap_or_default(),
            meta: metadata(m.metadata_props),
            graph,
            functions,
        })
    }

    fn function(&mut self, f: proto::FunctionProto) -> Result<Function, OnnxError> {
        let mut body = Graph::new(f.name.clone().unwrap_or_default());
        for name in &f.input {
            body.add_input(name.clone(), None)
                .map_err(|e| OnnxError::Invalid(format!("input '{name}': {e}")))?;
        }
        let mut attribute_defaults = Vec::new();
        for a in f.attribute_proto {
            attribute_defaults.push(self.attribute(a, &[])?);
        }
        self.nodes(&mut body, f.node, &[])?;
        let outputs = f
            .output
            .iter()
            .map(|name| {
                body.value_by_name(name).ok_or_else(|| {
                    OnnxError::Invalid(format!(
                        "output '{name}' is not defined by any node or input"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        body.set_outputs(outputs).map_err(ir_err)?;
        self.value_infos(&mut body, f.value_info)?;
        Ok(Function {
            name: f.name.unwrap_or_default(),
            domain: f.domain.unwrap_or_default(),
            overload: f.overload.unwrap_or_default(),
            attributes: f.attribute,
            attribute_defaults,
            opset_imports: opsets(f.opset_import),
            doc: f.doc_string.unwrap_or_default(),
            meta: metadata(f.metadata_props),
            body,
        })
    }

    /// Reads a graph. `outer` holds the names each enclosing graph defines;
    /// a name used here and defined there becomes a captured value.
    fn graph(
        &mut self,
        g: proto::GraphProto,
        outer: &[&HashSet<String>],
    ) -> Result<Graph, OnnxError> {
        let mut graph = Graph::new(g.name.clone().unwrap_or_default());
        graph.doc = g.doc_string.clone().unwrap_or_default();
        graph.meta = metadata(g.metadata_props.clone());
        if let Some(s) = g.sparse_initializer.first() {
            let name = s
                .values
                .as_ref()
                .and_then(|v| v.name.clone())
                .unwrap_or_default();
            return unsupported(format!(
                "sparse initializer '{name}': sparse tensors are not supported (densify the model first)"
            ));
        }
        let here = defined_names(&g);
        let mut scopes: Vec<&HashSet<String>> = outer.to_vec();
        scopes.push(&here);

        for t in g.initializer {
            let name = t.name.clone().unwrap_or_default();
            let ctx = format!("initializer '{name}'");
            if name.is_empty() {
                return invalid("an initializer has no name");
            }
            let doc = t.doc_string.clone().unwrap_or_default();
            let meta = metadata(t.metadata_props.clone());
            let tensor = self.tensor(t).map_err(|e| e.context(&ctx))?;
            let v = graph
                .add_initializer(name.clone(), tensor)
                .map_err(|e| match e {
                    IrError::DuplicateValueName(_) => {
                        OnnxError::Invalid(format!("{ctx} is defined twice"))
                    }
                    e => ir_err(e),
                })?;
            if let Some(init) = graph.initializer_mut(v).map_err(ir_err)? {
                init.doc = doc;
                init.meta = meta;
            }
        }
        let mut inputs = Vec::with_capacity(g.input.len());
        for vi in g.input {
            let name = vi.name.clone().unwrap_or_default();
            if name.is_empty() {
                return invalid("a graph input has no name");
            }
            let v = match graph.value_by_name(&name) {
                Some(v) if graph.value(v).initializer().is_some() && !inputs.contains(&v) => v,
                Some(_) => return invalid(format!("graph input '{name}' is listed twice")),
                None => graph.add_value(name.clone(), None).map_err(ir_err)?,
            };
            self.apply_value_info(&mut graph, v, vi)
                .map_err(|e| e.context(format!("graph input '{name}'")))?;
            inputs.push(v);
        }
        graph.set_inputs(inputs).map_err(ir_err)?;
        self.nodes(&mut graph, g.node, &scopes)?;

        let mut outputs = Vec::with_capacity(g.output.len());
        for vi in g.output {
            let name = vi.name.clone().unwrap_or_default();
            let v = match graph.value_by_name(&name) {
                Some(v) => v,
                // A subgraph may return a value of an enclosing graph as is.
                None if outer.iter().any(|s| s.contains(&name)) => {
                    graph.add_captured(name.clone()).map_err(ir_err)?
                }
                None => {
                    return invalid(format!(
                    "graph output '{name}' is not defined by any node, initializer or graph input"
                ))
                }
            };
            if graph.value(v).ty.is_none() || graph.value(v).initializer().is_some() {
                self.apply_value_info(&mut graph, v, vi)
                    .map_err(|e| e.context(format!("graph output '{name}'")))?;
            } else {
                // Also an input: the input's declaration stands; keep docs.
                self.apply_docs(&mut graph, v, vi)?;
            }
            outputs.push(v);
        }
        graph.set_outputs(outputs).map_err(ir_err)?;
        self.value_infos(&mut graph, g.value_info)?;
        for a in g.quantization_annotation {
            graph.quantization_annotations.push(TensorAnnotation {
                tensor: a.tensor_name.unwrap_or_default(),
                entries: metadata(a.quant_parameter_tensor_names),
            });
        }
        Ok(graph)
    }

    fn value_infos(
        &mut self,
        graph: &mut Graph,
        infos: Vec<proto::ValueInfoProto>,
    ) -> Result<(), OnnxError> {
        for vi in infos {
            let name = vi.name.clone().unwrap_or_default();
            match graph.value_by_name(&name) {
                Some(v) if graph.value(v).is_captured() => {
                    self.warn(format!(
                        "dropped value_info for '{name}', a value of an enclosing graph"
                    ));
                }
                Some(v) => self
                    .apply_value_info(graph, v, vi)
                    .map_err(|e| e.context(format!("value_info '{name}'")))?,
                None => self.warn(format!(
                    "dropped value_info for '{name}', which no node uses or defines"
                )),
            }
        }
        Ok(())
    }

    fn apply_docs(
        &mut self,
        graph: &mut Graph,
        v: ValueId,
        vi: proto::ValueInfoProto,
    ) -> Result<(), OnnxError> {
        let value = graph.value_mut(v).map_err(ir_err)?;
        if let Some(doc) = vi.doc_string.filter(|d| !d.is_empty()) {
            value.doc = doc;
        }
        if !vi.metadata_props.is_empty() {
            value.meta = metadata(vi.metadata_props);
        }
        Ok(())
    }

    fn apply_value_info(
        &mut self,
        graph: &mut Graph,
        v: ValueId,
        mut vi: proto::ValueInfoProto,
    ) -> Result<(), OnnxError> {
        if let Some(tp) = vi.r#type.take() {
            let ty = self.value_type(tp)?;
            if ty.is_some() {
                graph.declare_type(v, ty).map_err(ir_err)?;
            }
        }
        self.apply_docs(graph, v, vi)
    }

    fn nodes(
        &mut self,
        graph: &mut Graph,
        nodes: Vec<proto::NodeProto>,
        scopes: &[&HashSet<String>],
    ) -> Result<(), OnnxError> {
        // Values a node reads before any node defines them: either a later node
        // defines them (the file is not sorted) or they are undefined.
        let mut pending: HashMap<ValueId, String> = HashMap::new();
        let outer = &scopes[..scopes.len().saturating_sub(1)];
        for (index, n) in nodes.into_iter().enumerate() {
            let op = n.op_type.clone().unwrap_or_default();
            let label = match n.name.as_deref() {
                Some(name) if !name.is_empty() => format!("node '{name}' ({op})"),
                _ => format!("node #{index} ({op})"),
            };
            if op.is_empty() {
                return invalid(format!("{label} has no op_type"));
            }
            let mut inputs = Vec::with_capacity(n.input.len());
            for name in &n.input {
                if name.is_empty() {
                    inputs.push(None);
                    continue;
                }
                let v = match graph.value_by_name(name) {
                    Some(v) => v,
                    None if outer.iter().any(|s| s.contains(name)) => {
                        graph.add_captured(name.clone()).map_err(ir_err)?
                    }
                    None => {
                        let v = graph.add_value(name.clone(), None).map_err(ir_err)?;
                        pending.insert(v, label.clone());
                        v
                    }
                };
                inputs.push(Some(v));
            }
            let mut outputs = Vec::with_capacity(n.output.len());
            for name in &n.output {
                if name.is_empty() {
                    outputs.push(None);
                    continue;
                }
                let v = match graph.value_by_name(name) {
                    Some(v) if pending.remove(&v).is_some() => v,
                    Some(v) => {
                        let by = match graph.producer(v) {
                            Some((p, _)) => graph.describe_node(p),
                            None if graph.value(v).is_graph_input() => "a graph input".into(),
                            None if graph.value(v).initializer().is_some() => {
                                "an initializer".into()
                            }
                            None => "another definition".into(),
                        };
                        return invalid(format!(
                            "{label}: output '{name}' is already defined by {by}"
                        ));
                    }
                    None => graph.add_value(name.clone(), None).map_err(ir_err)?,
                };
                outputs.push(Some(v));
            }
            let mut attrs = Vec::with_capacity(n.attribute.len());
            for a in n.attribute {
                let aname = a.name.clone().unwrap_or_default();
                attrs.push(
                    self.attribute(a, scopes)
                        .map_err(|e| e.context(format!("{label}, attribute '{aname}'")))?,
                );
            }
            if !n.device_configurations.is_empty() {
                self.warn("dropped node device configurations (not kept by qgraph)".into());
            }
            let new = NewNode {
                name: n.name.unwrap_or_default(),
                op_type: op,
                domain: n.domain.unwrap_or_default(),
                overload: n.overload.unwrap_or_default(),
                inputs,
                outputs,
                attrs,
                doc: n.doc_string.unwrap_or_default(),
                meta: metadata(n.metadata_props),
            };
            graph.add_node(new).map_err(|e| match e {
                IrError::DuplicateNodeName(name) => {
                    OnnxError::Invalid(format!("node name '{name}' is used twice"))
                }
                IrError::RepeatedOutput { value } => {
                    OnnxError::Invalid(format!("{label}: output '{value}' is listed twice"))
                }
                e => OnnxError::Invalid(format!("{label}: {e}")),
            })?;
        }
        if let Some((v, label)) = pending.iter().min_by_key(|(v, _)| **v) {
            return invalid(format!(
                "{label}: input '{}' is not defined by any node, initializer or graph input",
                graph.value(*v).name()
            ));
        }
        Ok(())
    }

    fn attribute(
        &mut self,
        a: proto::AttributeProto,
        scopes: &[&HashSet<String>],
    ) -> Result<Attribute, OnnxError> {
        let name = a.name.clone().unwrap_or_default();
        if name.is_empty() {
            return invalid("an attribute has no name");
        }
        let kind = match a.r#type.filter(|&t| t != 0) {
            Some(code) => match attr_kind_from_code(code) {
                Some(k) => k,
                None => return invalid(format!("unknown attribute type {code}")),
            },
            None => match infer_kind(&a) {
                Some(k) => k,
                None => return invalid("the attribute has no type and no value"),
            },
        };
        let doc = a.doc_string.clone().unwrap_or_default();
        if let Some(r) = a.ref_attr_name.clone().filter(|r| !r.is_empty()) {
            return Ok(Attribute {
                name,
                value: AttrValue::Ref { name: r, kind },
                doc,
            });
        }
        let value = match kind {
            AttrKind::Float => AttrValue::Float(a.f.unwrap_or_default()),
            AttrKind::Int => AttrValue::Int(a.i.unwrap_or_default()),
            AttrKind::String => AttrValue::String(a.s.map(|b| b.to_vec()).unwrap_or_default()),
            AttrKind::Tensor => match a.t {
                Some(t) => AttrValue::Tensor(self.tensor(t)?),
                None => return invalid("tensor attribute without a tensor"),
            },
            AttrKind::Graph => match a.g {
                Some(g) => AttrValue::Graph(Box::new(self.graph(g, scopes)?)),
                None => return invalid("graph attribute without a graph"),
            },
            AttrKind::Type => match a.tp {
                Some(tp) => match self.value_type(tp)? {
                    Some(t) => AttrValue::Type(t),
                    None => return invalid("type attribute with an empty type"),
                },
                None => return invalid("type attribute without a type"),
            },
            AttrKind::Floats => AttrValue::Floats(a.floats),
            AttrKind::Ints => AttrValue::Ints(a.ints),
            AttrKind::Strings => {
                AttrValue::Strings(a.strings.into_iter().map(|b| b.to_vec()).collect())
            }
            AttrKind::Tensors => AttrValue::Tensors(
                a.tensors
                    .into_iter()
                    .map(|t| self.tensor(t))
                    .collect::<Result<_, _>>()?,
            ),
            AttrKind::Graphs => AttrValue::Graphs(
                a.graphs
                    .into_iter()
                    .map(|g| self.graph(g, scopes))
                    .collect::<Result<_, _>>()?,
            ),
            AttrKind::Types => {
                let mut types = Vec::new();
                for tp in a.type_protos {
                    match self.value_type(tp)? {
                        Some(t) => types.push(t),
                        None => return invalid("type list with an empty type"),
                    }
                }
                AttrValue::Types(types)
            }
            AttrKind::SparseTensor | AttrKind::SparseTensors => {
                return unsupported("sparse tensors are not supported (densify the model first)")
            }
        };
        Ok(Attribute { name, value, doc })
    }

    fn value_type(&mut self, tp: proto::TypeProto) -> Result<Option<ValueType>, OnnxError> {
        use proto::type_proto::Value as V;
        if tp.denotation.as_deref().is_some_and(|d| !d.is_empty()) {
            self.warn("dropped type denotations (not kept by qgraph)".into());
        }
        let Some(value) = tp.value else {
            return Ok(None);
        };
        let elem = |this: &mut Self,
                    t: Option<Box<proto::TypeProto>>,
                    what: &str|
         -> Result<ValueType, OnnxError> {
            match t.map(|t| this.value_type(*t)).transpose()?.flatten() {
                Some(t) => Ok(t),
                None => invalid(format!("{what} type without an element type")),
            }
        };
        Ok(Some(match value {
            V::TensorType(t) => ValueType::Tensor(self.tensor_type(t.elem_type, t.shape)?),
            V::SparseTensorType(t) => {
                ValueType::SparseTensor(self.tensor_type(t.elem_type, t.shape)?)
            }
            V::SequenceType(s) => {
                ValueType::Sequence(Box::new(elem(self, s.elem_type, "sequence")?))
            }
            V::OptionalType(o) => {
                ValueType::Optional(Box::new(elem(self, o.elem_type, "optional")?))
            }
            V::MapType(m) => {
                let key = m.key_type.unwrap_or_default();
                let Some(key) = dtype_from_code(key) else {
                    return unsupported(format!("map key type {key} is not an ONNX data type"));
                };
                ValueType::Map(key, Box::new(elem(self, m.value_type, "map")?))
            }
            V::OpaqueType(o) => ValueType::Opaque {
                domain: o.domain.unwrap_or_default(),
                name: o.name.unwrap_or_default(),
            },
        }))
    }

    fn tensor_type(
        &mut self,
        elem: Option<i32>,
        shape: Option<proto::TensorShapeProto>,
    ) -> Result<TensorType, OnnxError> {
        let dtype = match elem.filter(|&c| c != 0) {
            None => None,
            Some(code) => match dtype_from_code(code) {
                Some(d) => Some(d),
                None => return unsupported(format!("data type {code} is not an ONNX data type")),
            },
        };
        let shape = shape.map(|s| {
            s.dim
                .into_iter()
                .map(|d| {
                    if d.denotation.as_deref().is_some_and(|d| !d.is_empty()) {
                        self.warn("dropped dimension denotations (not kept by qgraph)".into());
                    }
                    use proto::tensor_shape_proto::dimension::Value as D;
                    match d.value {
                        Some(D::DimValue(v)) => Dim::Known(v),
                        Some(D::DimParam(p)) => Dim::Symbol(p),
                        None => Dim::Unknown,
                    }
                })
                .collect()
        });
        Ok(TensorType { dtype, shape })
    }

    fn tensor(&mut self, t: proto::TensorProto) -> Result<Tensor, OnnxError> {
        let code = t.data_type.unwrap_or_default();
        let dtype = match code {
            0 => return invalid("the tensor has no data type"),
            c => match dtype_from_code(c) {
                Some(d) => d,
                None => return unsupported(format!("data type {c} is not an ONNX data type")),
            },
        };
        let mut shape = Vec::with_capacity(t.dims.len());
        for &d in &t.dims {
            match usize::try_from(d) {
                Ok(d) => shape.push(d),
                Err(_) => return invalid(format!("dimension {d} is negative")),
            }
        }
        let Some(count) = qgraph_ir::element_count(&shape) else {
            return invalid(format!("shape {} has too many elements", ShapeFmt(&shape)));
        };
        let what = || format!("{dtype}{}", ShapeFmt(&shape));
        if t.segment.is_some() {
            return unsupported("segmented tensors are not supported");
        }
        if t.data_location == Some(proto::tensor_proto::DataLocation::External as i32) {
            let bytes = self.external(&t.external_data, dtype, count)?;
            return Tensor::from_le_bytes(dtype, &shape, &bytes)
                .map_err(|e| OnnxError::Invalid(e.to_string()));
        }
        if let Some(raw) = &t.raw_data {
            if dtype == DataType::String {
                return invalid("string tensors cannot use raw_data");
            }
            return Tensor::from_le_bytes(dtype, &shape, raw)
                .map_err(|e| OnnxError::Invalid(e.to_string()));
        }
        let tensor_err = |e: qgraph_ir::TensorError| OnnxError::Invalid(e.to_string());
        let typed_len = |n: usize, per: usize| -> Result<(), OnnxError> {
            let want = count.div_ceil(per);
            if n != want {
                invalid(format!("{} needs {want} typed values, found {n}", what()))
            } else {
                Ok(())
            }
        };
        Ok(match dtype {
            DataType::F32 => {
                typed_len(t.float_data.len(), 1)?;
                Tensor::f32(&shape, t.float_data).map_err(tensor_err)?
            }
            DataType::F64 => {
                typed_len(t.double_data.len(), 1)?;
                Tensor::from_floats(dtype, &shape, &t.double_data).map_err(tensor_err)?
            }
            DataType::C64 => {
                let bytes: Vec<u8> = t.float_data.iter().flat_map(|x| x.to_le_bytes()).collect();
                self.packed(dtype, &shape, bytes, count * 2, t.float_data.len())?
            }
            DataType::C128 => {
                let bytes: Vec<u8> = t.double_data.iter().flat_map(|x| x.to_le_bytes()).collect();
                self.packed(dtype, &shape, bytes, count * 2, t.double_data.len())?
            }
            DataType::I64 => {
                typed_len(t.int64_data.len(), 1)?;
                let v: Vec<i128> = t.int64_data.iter().map(|&x| x as i128).collect();
                Tensor::from_ints(dtype, &shape, &v).map_err(tensor_err)?
            }
            DataType::U32 | DataType::U64 => {
                typed_len(t.uint64_data.len(), 1)?;
                let v: Vec<i128> = t.uint64_data.iter().map(|&x| x as i128).collect();
                Tensor::from_ints(dtype, &shape, &v).map_err(tensor_err)?
            }
            DataType::String => {
                typed_len(t.string_data.len(), 1)?;
                Tensor::from_strings(
                    &shape,
                    t.string_data.into_iter().map(|b| b.to_vec()).collect(),
                )
                .map_err(tensor_err)?
            }
            DataType::I8
            | DataType::U8
            | DataType::I16
            | DataType::U16
            | DataType::I32
            | DataType::Bool => {
                typed_len(t.int32_data.len(), 1)?;
                let v: Vec<i128> = t.int32_data.iter().map(|&x| x as i128).collect();
                Tensor::from_ints(dtype, &shape, &v).map_err(tensor_err)?
            }
            DataType::F16 | DataType::BF16 => {
                typed_len(t.int32_data.len(), 1)?;
                let mut bytes = Vec::with_capacity(count * 2);
                for &x in &t.int32_data {
                    let bits = u16::try_from(x)
                        .or_else(|_| invalid(format!("{x} is not a 16-bit pattern")))?;
                    bytes.extend_from_slice(&bits.to_le_bytes());
                }
                Tensor::from_le_bytes(dtype, &shape, &bytes).map_err(tensor_err)?
            }
            DataType::F6E2M3 | DataType::F6E3M2 => {
                typed_len(t.int32_data.len(), 1)?;
                let mut bits: Vec<u8> = Vec::with_capacity(count);
                for &x in &t.int32_data {
                    match u8::try_from(x) {
                        Ok(b) if b < 64 => bits.push(b),
                        _ => return invalid(format!("{x} is not a 6-bit pattern")),
                    }
                }
                Tensor::Packed(
                    PackedTensor::new(dtype, &shape, pack_6bit(&bits)).map_err(tensor_err)?,
                )
            }
            _ => {
                // 8-bit floats: one element per entry; 4- and 2-bit types:
                // one packed byte per entry.
                let per = 8 / dtype.bits().unwrap_or(8);
                typed_len(t.int32_data.len(), per)?;
                let mut bytes = Vec::with_capacity(t.int32_data.len());
                for &x in &t.int32_data {
                    bytes.push(
                        u8::try_from(x)
                            .or_else(|_| invalid(format!("{x} is not an 8-bit pattern")))?,
                    );
                }
                Tensor::Packed(PackedTensor::new(dtype, &shape, bytes).map_err(tensor_err)?)
            }
        })
    }

    fn packed(
        &self,
        dtype: DataType,
        shape: &[usize],
        bytes: Vec<u8>,
        want: usize,
        found: usize,
    ) -> Result<Tensor, OnnxError> {
        if want != found {
            return invalid(format!(
                "{dtype}{} needs {want} typed values, found {found}",
                ShapeFmt(shape)
            ));
        }
        Ok(Tensor::Packed(
            PackedTensor::new(dtype, shape, bytes)
                .map_err(|e| OnnxError::Invalid(e.to_string()))?,
        ))
    }

    /// Reads a tensor's bytes from its external data file.
    fn external(
        &mut self,
        entries: &[proto::StringStringEntryProto],
        dtype: DataType,
        count: usize,
    ) -> Result<Vec<u8>, OnnxError> {
        let get = |key: &str| {
            entries
                .iter()
                .find(|e| e.key.as_deref() == Some(key))
                .and_then(|e| e.value.clone())
        };
        let Some(location) = get("location") else {
            return invalid("external data without a location");
        };
        let Some(dir) = self.dir else {
            return unsupported(format!(
                "the tensor's data is in external file '{location}', which needs the model's file path"
            ));
        };
        let rel = Path::new(&location);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return invalid(format!(
                "external data location '{location}' must be a relative path inside the model's directory"
            ));
        }
        let number = |key: &str| -> Result<Option<u64>, OnnxError> {
            match get(key) {
                None => Ok(None),
                Some(s) => s
                    .trim()
                    .parse::<u64>()
                    .map(Some)
                    .or_else(|_| invalid(format!("external data {key} '{s}' is not a number"))),
            }
        };
        let offset = number("offset")?.unwrap_or(0);
        let Some(expected) = dtype.packed_len(count) else {
            return invalid(format!("{dtype} tensors cannot be stored as external data"));
        };
        if let Some(length) = number("length")? {
            if length != expected as u64 {
                return invalid(format!(
                    "external data length {length} does not match the {expected} bytes the tensor needs"
                ));
            }
        }
        let path = dir.join(rel);
        if !self.files.contains_key(&path) {
            let f = File::open(&path).map_err(|e| {
                OnnxError::Invalid(format!(
                    "cannot open external data file '{}': {e}",
                    path.display()
                ))
            })?;
            self.files.insert(path.clone(), f);
        }
        let file = self.files.get_mut(&path).expect("inserted above");
        let size = file.metadata().map_err(|e| OnnxError::io(&path, e))?.len();
        if offset
            .checked_add(expected as u64)
            .is_none_or(|end| end > size)
        {
            return invalid(format!(
                "external data at offset {offset}, {expected} bytes, runs past the end of '{}' ({size} bytes)",
                path.display()
            ));
        }
        let mut bytes = vec![0u8; expected];
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| OnnxError::io(&path, e))?;
        file.read_exact(&mut bytes)
            .map_err(|e| OnnxError::io(&path, e))?;
        self.used_external_data = true;
        Ok(bytes)
    }
}

/// Infers an attribute's kind from the field in use, for files that omit
/// the `type` discriminator (IR version 1).
fn infer_kind(a: &proto::AttributeProto) -> Option<AttrKind> {
    Some(if a.f.is_some() {
        AttrKind::Float
    } else if a.i.is_some() {
        AttrKind::Int
    } else if a.s.is_some() {
        AttrKind::String
    } else if a.t.is_some() {
        AttrKind::Tensor
    } else if a.g.is_some() {
        AttrKind::Graph
    } else if a.tp.is_some() {
        AttrKind::Type
    } else if !a.floats.is_empty() {
        AttrKind::Floats
    } else if !a.ints.is_empty() {
        AttrKind::Ints
    } else if !a.strings.is_empty() {
        AttrKind::Strings
    } else if !a.tensors.is_empty() {
        AttrKind::Tensors
    } else if !a.graphs.is_empty() {
        AttrKind::Graphs
    } else if !a.type_protos.is_empty() {
        AttrKind::Types
    } else if a.sparse_tensor.is_some() || !a.sparse_tensors.is_empty() {
        AttrKind::SparseTensor
    } else {
        return None;
    })
}

/// Packs 6-bit values four to three bytes, as a little-endian bit stream.
pub(crate) fn pack_6bit(values: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; (values.len() * 6).div_ceil(8)];
    for (i, &v) in values.iter().enumerate() {
        let bit = i * 6;
        let (byte, shift) = (bit / 8, bit % 8);
        let word = (v as u16 & 0x3f) << shift;
        out[byte] |= word as u8;
        if shift > 2 {
            out[byte + 1] |= (word >> 8) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn six_bit_packing_follows_the_spec_formula() {
        let x = [0x3fu8, 0x01, 0x2a, 0x15];
        let b = pack_6bit(&x);
        assert_eq!(b[0], x[0] | ((x[1] & 0x3) << 6));
        assert_eq!(b[1], (x[1] >> 2) | ((x[2] & 0xF) << 4));
        assert_eq!(b[2], (x[2] >> 4) | (x[3] << 2));
        assert_eq!(pack_6bit(&[0x3f]).len(), 1);
    }
}

/// One serialized `TensorProto` (an ONNX test data set's `input_0.pb`): its
/// name (empty when it has none) and its values.
pub fn decode_tensor(bytes: &[u8]) -> Result<(String, Tensor), OnnxError> {
    let proto = proto::TensorProto::decode(bytes).map_err(|e| one_line(decode_error(&e)))?;
    tensor_from_proto(proto)
}

/// A `TensorProto` already parsed (an element of a sequence or optional):
/// its name and its values.
pub(crate) fn tensor_from_proto(proto: proto::TensorProto) -> Result<(String, Tensor), OnnxError> {
    let name = proto.name.clone().unwrap_or_default();
    let mut reader = Reader {
        dir: None,
        warnings: Vec::new(),
        used_external_data: false,
        files: HashMap::new(),
    };
    let tensor = reader.tensor(proto).map_err(one_line)?;
    Ok((name, tensor))
}
