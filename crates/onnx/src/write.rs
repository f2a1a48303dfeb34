//! IR -> ONNX protobuf. Deterministic: nodes in topological order (file order
//! kept where the graph allows), initializers and value_info in value creation
//! order, tensor data always as `raw_data` (strings as `string_data`).

use crate::codes::{attr_kind_code, dtype_code};
use crate::error::{invalid, OnnxError};
use crate::proto;
use bytes::Bytes;
use prost::Message;
use qgraph_ir::{AttrValue, Attribute, Graph, Metadata, Model, Tensor, TensorType, ValueType};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Protobuf refuses messages of 2 GiB or more; leave room for the graph.
const PROTOBUF_LIMIT: u64 = (1 << 31) - (64 << 20);
/// Tensors smaller than this stay inline when data goes external.
const EXTERNAL_MIN_BYTES: usize = 4096;
/// External tensors start at multiples of the page size, so they can be mapped.
const EXTERNAL_ALIGN: u64 = 4096;

/// Where initializer data goes when writing a file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExternalData {
    /// Inline unless the model would pass protobuf's 2 GiB limit.
    #[default]
    Auto,
    /// Always inline (fails past 2 GiB).
    Never,
    /// Initializers of at least `EXTERNAL_MIN_BYTES` go to `<file>.data`.
    Always,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct WriteOptions {
    pub external_data: ExternalData,
}

/// What a write produced.
#[derive(Debug, Default)]
pub struct WriteReport {
    /// The external data file, when one was written.
    pub external_file: Option<PathBuf>,
    pub bytes_written: u64,
}

/// Encodes a model to bytes, all data inline.
pub fn encode_model(model: &Model) -> Result<Vec<u8>, OnnxError> {
    let mut w = Writer { external: None };
    let proto = w.model(model)?;
    Ok(proto.encode_to_vec())
}

/// Writes a model atomically: to a temporary file beside `path`, then a
/// rename, so a failure never leaves a half-written model behind.
pub fn write_model(
    model: &Model,
    path: &Path,
    options: &WriteOptions,
) -> Result<WriteReport, OnnxError> {
    let externalize = match options.external_data {
        ExternalData::Never => false,
        ExternalData::Always => true,
        ExternalData::Auto => initializer_bytes(&model.graph) >= PROTOBUF_LIMIT,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| OnnxError::Invalid(format!("'{}' is not a file path", path.display())))?
        .to_string_lossy()
        .into_owned();
    let location = format!("{file_name}.data");
    let mut w = Writer {
        external: externalize.then(|| External {
            location: location.clone(),
            data: Vec::new(),
        }),
    };
    let proto = w.model(model)?;
    let bytes = proto.encode_to_vec();
    if bytes.len() as u64 >= (1 << 31) {
        return invalid(format!(
            "the model encodes to {} bytes, past protobuf's 2 GiB limit even with external data",
            bytes.len()
        ));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut report = WriteReport::default();
    if let Some(ext) = w.external.filter(|e| !e.data.is_empty()) {
        let data_path = dir.join(&location);
        write_atomic(&data_path, &ext.data)?;
        report.bytes_written += ext.data.len() as u64;
        report.external_file = Some(data_path);
    }
    write_atomic(path, &bytes)?;
    report.bytes_written += bytes.len() as u64;
    Ok(report)
}

/// Temporary files are named `.qgraph-` + [`TMP_RANDOM`] ASCII letters and
/// digits + `.tmp`, in the directory of the file they become.
const TMP_PREFIX: &str = ".qgraph-";
const TMP_SUFFIX: &str = ".tmp";
const TMP_RANDOM: usize = 16;
/// A temporary file of ours older than this was left by a write that was
/// killed; younger ones may belong to a write still running.
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// Writes bytes to `path` through a temporary file in the same directory and
/// a rename: readers see the old file or the whole new one, never a part.
/// The data reaches the disk before the rename (and the rename before this
/// returns, where the directory can be synced), so a crash cannot publish a
/// torn file. Temporary files of ours that a killed write left in that
/// directory more than an hour ago are removed first.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), OnnxError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    remove_stale_temporaries(dir);
    let mut builder = tempfile::Builder::new();
    builder
        .prefix(TMP_PREFIX)
        .suffix(TMP_SUFFIX)
        .rand_bytes(TMP_RANDOM);
    // A temporary file is private (0600); the file it becomes is an
    // ordinary output, readable as any other the user writes.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    let mut tmp = builder
        .tempfile_in(dir)
        .map_err(|e| OnnxError::io(dir, e))?;
    tmp.write_all(bytes)
        .map_err(|e| OnnxError::io(tmp.path(), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| OnnxError::io(tmp.path(), e))?;
    tmp.persist(path)
        .map_err(|e| OnnxError::io(path, e.error))?;
    sync_dir(dir);
    Ok(())
}

/// Makes a rename in `dir` durable. Best effort: some file systems refuse to
/// sync a directory, and the file itself is already on disk.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Whether `name` is one of our temporary files: exactly `.qgraph-`, then
/// [`TMP_RANDOM`] ASCII letters and digits, then `.tmp`.
fn is_our_temporary(name: &str) -> bool {
    name.len() == TMP_PREFIX.len() + TMP_RANDOM + TMP_SUFFIX.len()
        && name
            .strip_prefix(TMP_PREFIX)
            .and_then(|r| r.strip_suffix(TMP_SUFFIX))
            .is_some_and(|r| r.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Removes what killed writes left in `dir`: regular files named as ours
/// and last modified more than [`STALE_AFTER`] ago. Nothing else is
/// touched, nor a temporary file a concurrent write may still be filling.
/// Best effort: a directory that cannot be listed leaves nothing to do.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(is_our_temporary) {
            continue;
        }
        // Not following links: a link named as ours is not ours.
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let stale = meta.is_file()
            && meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > STALE_AFTER);
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn initializer_bytes(g: &Graph) -> u64 {
    g.initializers()
        .iter()
        .filter_map(|&v| g.initializer(v))
        .map(|i| i.tensor.le_bytes_len().unwrap_or(0) as u64)
        .sum()
}

struct External {
    location: String,
    data: Vec<u8>,
}

struct Writer {
    external: Option<External>,
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn metadata(m: &Metadata) -> Vec<proto::StringStringEntryProto> {
    m.iter()
        .map(|(k, v)| proto::StringStringEntryProto {
            key: Some(k.clone()),
            value: Some(v.clone()),
        })
        .collect()
}

fn opsets(imports: &[qgraph_ir::OpsetImport]) -> Vec<proto::OperatorSetIdProto> {
    imports
        .iter()
        .map(|o| proto::OperatorSetIdProto {
            domain: Some(o.domain.clone()),
            version: Some(o.version),
        })
        .collect()
}

fn tensor_type(t: &TensorType) -> (Option<i32>, Option<proto::TensorShapeProto>) {
    use proto::tensor_shape_proto::{dimension::Value as D, Dimension};
    let shape = t.shape.as_ref().map(|dims| proto::TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| Dimension {
                denotation: None,
                value: match d {
                    qgraph_ir::Dim::Known(k) => Some(D::DimValue(*k)),
                    qgraph_ir::Dim::Symbol(s) => Some(D::DimParam(s.clone())),
                    qgraph_ir::Dim::Unknown => None,
                },
            })
            .collect(),
    });
    (Some(t.dtype.map(dtype_code).unwrap_or(0)), shape)
}

fn value_type(t: &ValueType) -> proto::TypeProto {
    use proto::type_proto::{self as tp, Value as V};
    let value = match t {
        ValueType::Tensor(t) => {
            let (elem_type, shape) = tensor_type(t);
            V::TensorType(tp::Tensor { elem_type, shape })
        }
        ValueType::SparseTensor(t) => {
            let (elem_type, shape) = tensor_type(t);
            V::SparseTensorType(tp::SparseTensor { elem_type, shape })
        }
        ValueType::Sequence(e) => V::SequenceType(Box::new(tp::Sequence {
            elem_type: Some(Box::new(value_type(e))),
        })),
        ValueType::Optional(e) => V::OptionalType(Box::new(tp::Optional {
            elem_type: Some(Box::new(value_type(e))),
        })),
        ValueType::Map(k, v) => V::MapType(Box::new(tp::Map {
            key_type: Some(dtype_code(*k)),
            value_type: Some(Box::new(value_type(v))),
        })),
        ValueType::Opaque { domain, name } => V::OpaqueType(tp::Opaque {
            domain: opt(domain),
            name: opt(name),
        }),
    };
    proto::TypeProto {
        denotation: None,
        value: Some(value),
    }
}

impl Writer {
    fn model(&mut self, m: &Model) -> Result<proto::ModelProto, OnnxError> {
        let mut functions = Vec::with_capacity(m.functions.len());
        for f in &m.functions {
            functions.push(
                self.function(f)
                    .map_err(|e| e.context(format!("function '{}'", f.name)))?,
            );
        }
        Ok(proto::ModelProto {
            ir_version: Some(m.ir_version),
            opset_import: opsets(&m.opset_imports),
            producer_name: opt(&m.producer_name),
            producer_version: opt(&m.producer_version),
            domain: opt(&m.domain),
            model_version: (m.model_version != 0).then_some(m.model_version),
            doc_string: opt(&m.doc),
            graph: Some(self.graph(&m.graph, true)?),
            metadata_props: metadata(&m.meta),
            training_info: Vec::new(),
            functions,
            configuration: Vec::new(),
        })
    }

    fn function(&mut self, f: &qgraph_ir::Function) -> Result<proto::FunctionProto, OnnxError> {
        let g = &f.body;
        let names = |ids: &[qgraph_ir::ValueId]| {
            ids.iter().map(|&v| g.value(v).name().to_string()).collect()
        };
        let mut attribute_proto = Vec::with_capacity(f.attribute_defaults.len());
        for a in &f.attribute_defaults {
            attribute_proto.push(self.attribute(a)?);
        }
        let value_info = g
            .value_ids()
            .into_iter()
            .map(|v| g.value(v))
            .filter(|v| v.ty.is_some() || !v.doc.is_empty() || !v.meta.is_empty())
            .map(|v| proto::ValueInfoProto {
                name: Some(v.name().to_string()),
                r#type: v.ty.as_ref().map(value_type),
                doc_string: opt(&v.doc),
                metadata_props: metadata(&v.meta),
            })
            .collect();
        Ok(proto::FunctionProto {
            name: Some(f.name.clone()),
            input: names(g.inputs()),
            output: names(g.outputs()),
            attribute: f.attributes.clone(),
            attribute_proto,
            node: self.nodes(g)?,
            doc_string: opt(&f.doc),
            opset_import: opsets(&f.opset_imports),
            domain: opt(&f.domain),
            overload: opt(&f.overload),
            value_info,
            metadata_props: metadata(&f.meta),
        })
    }

    fn graph(&mut self, g: &Graph, top_level: bool) -> Result<proto::GraphProto, OnnxError> {
        let info = |v: qgraph_ir::ValueId| {
            let val = g.value(v);
            proto::ValueInfoProto {
                name: Some(val.name().to_string()),
                r#type: val.effective_type().as_ref().map(value_type),
                doc_string: opt(&val.doc),
                metadata_props: metadata(&val.meta),
            }
        };
        let input = g.inputs().iter().map(|&v| info(v)).collect();
        let output = g.outputs().iter().map(|&v| info(v)).collect();
        let mut initializer = Vec::new();
        let mut value_info = Vec::new();
        for v in g.value_ids() {
            let val = g.value(v);
            if let Some(init) = val.initializer() {
                let mut t = self
                    .tensor(&init.tensor, top_level)
                    .map_err(|e| e.context(format!("initializer '{}'", val.name())))?;
                t.name = Some(val.name().to_string());
                t.doc_string = opt(&init.doc);
                t.metadata_props = metadata(&init.meta);
                initializer.push(t);
            }
            let listed = val.is_graph_input() || val.is_graph_output() || val.is_captured();
            if !listed && (val.ty.is_some() || !val.doc.is_empty() || !val.meta.is_empty()) {
                value_info.push(info(v));
            }
        }
        Ok(proto::GraphProto {
            node: self.nodes(g)?,
            name: opt(&g.name),
            initializer,
            sparse_initializer: Vec::new(),
            doc_string: opt(&g.doc),
            input,
            output,
            value_info,
            quantization_annotation: g
                .quantization_annotations
                .iter()
                .map(|a| proto::TensorAnnotation {
                    tensor_name: Some(a.tensor.clone()),
                    quant_parameter_tensor_names: metadata(&a.entries),
                })
                .collect(),
            metadata_props: metadata(&g.meta),
        })
    }

    fn nodes(&mut self, g: &Graph) -> Result<Vec<proto::NodeProto>, OnnxError> {
        let order = g.topo_order().map_err(|c| {
            let names: Vec<String> = c
                .nodes
                .iter()
                .take(4)
                .map(|&n| g.describe_node(n))
                .collect();
            OnnxError::Invalid(format!(
                "the graph has a cycle through {}",
                names.join(", ")
            ))
        })?;
        let name_of = |v: &Option<qgraph_ir::ValueId>| {
            v.map(|v| g.value(v).name().to_string()).unwrap_or_default()
        };
        let mut nodes = Vec::with_capacity(order.len());
        for id in order {
            let n = g.node(id);
            let mut attribute = Vec::with_capacity(n.attrs.len());
            for a in &n.attrs {
                attribute.push(self.attribute(a).map_err(|e| {
                    e.context(format!("{}, attribute '{}'", g.describe_node(id), a.name))
                })?);
            }
            nodes.push(proto::NodeProto {
                input: n.inputs().iter().map(name_of).collect(),
                output: n.outputs().iter().map(name_of).collect(),
                name: opt(n.name()),
                op_type: Some(n.op_type.clone()),
                domain: opt(&n.domain),
                overload: opt(&n.overload),
                attribute,
                doc_string: opt(&n.doc),
                metadata_props: metadata(&n.meta),
                device_configurations: Vec::new(),
            });
        }
        Ok(nodes)
    }

    fn attribute(&mut self, a: &Attribute) -> Result<proto::AttributeProto, OnnxError> {
        let mut p = proto::AttributeProto {
            name: Some(a.name.clone()),
            doc_string: opt(&a.doc),
            r#type: Some(attr_kind_code(a.value.kind())),
            ..Default::default()
        };
        match &a.value {
            AttrValue::Float(f) => p.f = Some(*f),
            AttrValue::Int(i) => p.i = Some(*i),
            AttrValue::String(s) => p.s = Some(Bytes::from(s.clone())),
            AttrValue::Tensor(t) => p.t = Some(self.tensor(t, false)?),
            AttrValue::Graph(g) => p.g = Some(self.graph(g, false)?),
            AttrValue::Type(t) => p.tp = Some(value_type(t)),
            AttrValue::Floats(v) => p.floats = v.clone(),
            AttrValue::Ints(v) => p.ints = v.clone(),
            AttrValue::Strings(v) => p.strings = v.iter().map(|s| Bytes::from(s.clone())).collect(),
            AttrValue::Tensors(ts) => {
                p.tensors = ts
                    .iter()
                    .map(|t| self.tensor(t, false))
                    .collect::<Result<_, _>>()?;
            }
            AttrValue::Graphs(gs) => {
                p.graphs = gs
                    .iter()
                    .map(|g| self.graph(g, false))
                    .collect::<Result<_, _>>()?;
            }
            AttrValue::Types(ts) => p.type_protos = ts.iter().map(value_type).collect(),
            AttrValue::Ref { name, .. } => p.ref_attr_name = Some(name.clone()),
        }
        Ok(p)
    }

    /// Converts a tensor; `may_externalize` is true for top-level initializers.
    fn tensor(
        &mut self,
        t: &Tensor,
        may_externalize: bool,
    ) -> Result<proto::TensorProto, OnnxError> {
        let mut p = proto::TensorProto {
            dims: t.shape().iter().map(|&d| d as i64).collect(),
            data_type: Some(dtype_code(t.dtype())),
            ..Default::default()
        };
        match t {
            Tensor::Elided(_) => return invalid(
                "its data was elided in the text form it came from; an ONNX file needs the values",
            ),
            Tensor::String(a) => p.string_data = a.iter().map(|s| Bytes::from(s.clone())).collect(),
            t => {
                let bytes = t
                    .to_le_bytes()
                    .map_err(|e| OnnxError::Invalid(e.to_string()))?;
                match &mut self.external {
                    Some(ext) if may_externalize && bytes.len() >= EXTERNAL_MIN_BYTES => {
                        let offset =
                            (ext.data.len() as u64).div_ceil(EXTERNAL_ALIGN) * EXTERNAL_ALIGN;
                        ext.data.resize(offset as usize, 0);
                        ext.data.extend_from_slice(&bytes);
                        let entry = |k: &str, v: String| proto::StringStringEntryProto {
                            key: Some(k.to_string()),
                            value: Some(v),
                        };
                        p.external_data = vec![
                            entry("location", ext.location.clone()),
                            entry("offset", offset.to_string()),
                            entry("length", bytes.len().to_string()),
                        ];
                        p.data_location = Some(proto::tensor_proto::DataLocation::External as i32);
                    }
                    _ => p.raw_data = Some(Bytes::from(bytes)),
                }
            }
        }
        Ok(p)
    }
}

/// One tensor as a serialized `TensorProto` named `name` (an ONNX test data
/// set's `output_0.pb`).
pub fn encode_tensor(name: &str, tensor: &Tensor) -> Result<Vec<u8>, OnnxError> {
    Ok(tensor_to_proto(name, tensor)?.encode_to_vec())
}

/// A tensor as a `TensorProto` with its data inline.
pub(crate) fn tensor_to_proto(
    name: &str,
    tensor: &Tensor,
) -> Result<proto::TensorProto, OnnxError> {
    let mut w = Writer { external: None };
    let mut proto = w.tensor(tensor, false)?;
    proto.name = opt(name);
    Ok(proto)
}
