//! The dataflow graph: nodes (operators) and values (tensors) as the two kinds
//! of vertex of one `petgraph::StableGraph`.
//!
//! Edges run value -> node (an input, weighted by the input slot) and
//! node -> value (an output, weighted by the output slot), so the producer of a
//! value is its one incoming edge and its consumers are its outgoing edges:
//! both lookups are O(1) in the size of the graph.
//!
//! `StableGraph` reuses a freed slot for the next vertex added, so a bare index
//! kept across a removal could silently name a new vertex. Every id therefore
//! carries the serial number its vertex got at creation; looking up an id whose
//! serial does not match the vertex in its slot fails (`IrError::Stale*`)
//! instead of returning the wrong vertex.

use crate::{AttrValue, Attribute, Tensor, ValueType};
use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction::{Incoming, Outgoing};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt;

/// Ordered key/value metadata (ONNX `metadata_props`); keys should be
/// distinct but files do not always obey, so order and repeats are kept.
pub type Metadata = Vec<(String, String)>;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    // Serial first: sorting ids sorts them by creation order.
    serial: u64,
    index: u32,
}

/// Id of a node (an operator) in a [`Graph`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Key);

/// Id of a value (a tensor) in a [`Graph`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(Key);

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node#{}", self.0.serial)
    }
}

impl fmt::Debug for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "value#{}", self.0.serial)
    }
}

/// An operator application.
#[derive(Clone, Debug)]
pub struct Node {
    name: String,
    serial: u64,
    pub op_type: String,
    /// Operator set domain; "" is the default ONNX domain.
    pub domain: String,
    /// Overload id of a model-local function call (ONNX IR 10).
    pub overload: String,
    pub attrs: Vec<Attribute>,
    pub doc: String,
    pub meta: Metadata,
    inputs: Vec<Option<ValueId>>,
    outputs: Vec<Option<ValueId>>,
}

/// A tensor flowing through the graph.
#[derive(Clone, Debug)]
pub struct Value {
    name: String,
    serial: u64,
    /// The declared type (graph input/output or value_info). For an
    /// initializer, only a declaration that differs from the tensor's own type
    /// is kept (see [`Graph::declare_type`]).
    pub ty: Option<ValueType>,
    pub doc: String,
    pub meta: Metadata,
    init: Option<Box<Initializer>>,
    is_input: bool,
    is_output: bool,
    captured: bool,
}

/// The constant data of an initializer, with the tensor's own doc and metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Initializer {
    pub tensor: Tensor,
    pub doc: String,
    pub meta: Metadata,
}

/// ONNX `quantization_annotation`: quantization parameters named for a tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorAnnotation {
    pub tensor: String,
    pub entries: Metadata,
}

/// What defines a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueDef {
    /// A graph input (it may also have an initializer as its default).
    Input,
    Initializer,
    /// Output `slot` of a node.
    Node(NodeId, usize),
    /// A value of an enclosing graph, used inside this subgraph.
    Captured,
    /// Nothing: an error once the graph is verified.
    Undefined,
}

#[derive(Clone, Debug)]
enum Vertex {
    Node(Node),
    Value(Value),
}

/// Errors of the mutation API. They name values and nodes, never raw ids,
/// except for stale ids, which are programming errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IrError {
    #[error("stale node id {0:?}: that node was removed")]
    StaleNode(NodeId),
    #[error("stale value id {0:?}: that value was removed")]
    StaleValue(ValueId),
    #[error("a value named '{0}' already exists")]
    DuplicateValueName(String),
    #[error("a node named '{0}' already exists")]
    DuplicateNodeName(String),
    #[error("value '{value}' is already produced by {by}")]
    AlreadyProduced { value: String, by: String },
    #[error("value '{value}' cannot be a node output: it is {what}")]
    NotProducible { value: String, what: &'static str },
    #[error("value '{value}' is listed twice among the outputs of one node")]
    RepeatedOutput { value: String },
    #[error("{node} has no input slot {slot}")]
    NoSuchSlot { node: String, slot: usize },
    #[error("value '{value}' is still used ({uses})")]
    InUse { value: String, uses: String },
    #[error("value '{value}' cannot be {what}: it is {why}")]
    BadRole {
        value: String,
        what: &'static str,
        why: &'static str,
    },
}

/// A node to add with [`Graph::add_node`].
#[derive(Clone, Debug, Default)]
pub struct NewNode {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub overload: String,
    pub inputs: Vec<Option<ValueId>>,
    pub outputs: Vec<Option<ValueId>>,
    pub attrs: Vec<Attribute>,
    pub doc: String,
    pub meta: Metadata,
}

impl NewNode {
    pub fn new(op_type: impl Into<String>) -> NewNode {
        NewNode {
            op_type: op_type.into(),
            ..NewNode::default()
        }
    }

    pub fn named(mut self, name: impl Into<String>) -> NewNode {
        self.name = name.into();
        self
    }

    pub fn domain(mut self, domain: impl Into<String>) -> NewNode {
        self.domain = domain.into();
        self
    }

    pub fn inputs(mut self, inputs: impl IntoIterator<Item = ValueId>) -> NewNode {
        self.inputs = inputs.into_iter().map(Some).collect();
        self
    }

    pub fn outputs(mut self, outputs: impl IntoIterator<Item = ValueId>) -> NewNode {
        self.outputs = outputs.into_iter().map(Some).collect();
        self
    }

    pub fn attr(mut self, name: impl Into<String>, value: AttrValue) -> NewNode {
        self.attrs.push(Attribute::new(name, value));
        self
    }
}

impl Node {
    /// The node's name; may be empty (ONNX makes it optional).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn inputs(&self) -> &[Option<ValueId>] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[Option<ValueId>] {
        &self.outputs
    }

    pub fn attr(&self, name: &str) -> Option<&AttrValue> {
        self.attrs.iter().find(|a| a.name == name).map(|a| &a.value)
    }

    /// Creation order; the tie-breaker of [`Graph::topo_order`].
    pub fn serial(&self) -> u64 {
        self.serial
    }
}

impl Value {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn initializer(&self) -> Option<&Initializer> {
        self.init.as_deref()
    }

    pub fn is_graph_input(&self) -> bool {
        self.is_input
    }

    pub fn is_graph_output(&self) -> bool {
        self.is_output
    }

    pub fn is_captured(&self) -> bool {
        self.captured
    }

    /// The declared type, or for an initializer its tensor's exact type.
    pub fn effective_type(&self) -> Option<ValueType> {
        match (&self.ty, &self.init) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(i)) => Some(ValueType::Tensor(crate::TensorType::of_concrete(
                i.tensor.dtype(),
                i.tensor.shape(),
            ))),
            (None, None) => None,
        }
    }

    pub fn serial(&self) -> u64 {
        self.serial
    }
}

/// A computation graph: the model's main graph, a subgraph held by an
/// attribute, or a function body.
#[derive(Clone, Debug)]
pub struct Graph {
    pub name: String,
    pub doc: String,
    pub meta: Metadata,
    pub quantization_annotations: Vec<TensorAnnotation>,
    g: StableGraph<Vertex, u32>,
    inputs: Vec<ValueId>,
    outputs: Vec<ValueId>,
    value_names: HashMap<String, ValueId>,
    node_names: HashMap<String, NodeId>,
    next_serial: u64,
}

/// A cycle found while ordering nodes: the names of nodes on or behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cycle {
    pub nodes: Vec<NodeId>,
}

impl Default for Graph {
    fn default() -> Graph {
        Graph::new("")
    }
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            doc: String::new(),
            meta: Metadata::new(),
            quantization_annotations: Vec::new(),
            g: StableGraph::default(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            value_names: HashMap::new(),
            node_names: HashMap::new(),
            next_serial: 0,
        }
    }

    fn next_serial(&mut self) -> u64 {
        self.next_serial += 1;
        self.next_serial
    }

    fn index_of_node(&self, id: NodeId) -> Result<NodeIndex, IrError> {
        let ix = NodeIndex::new(id.0.index as usize);
        match self.g.node_weight(ix) {
            Some(Vertex::Node(n)) if n.serial == id.0.serial => Ok(ix),
            _ => Err(IrError::StaleNode(id)),
        }
    }

    fn index_of_value(&self, id: ValueId) -> Result<NodeIndex, IrError> {
        let ix = NodeIndex::new(id.0.index as usize);
        match self.g.node_weight(ix) {
            Some(Vertex::Value(v)) if v.serial == id.0.serial => Ok(ix),
            _ => Err(IrError::StaleValue(id)),
        }
    }

    fn node_id_at(&self, ix: NodeIndex) -> NodeId {
        match &self.g[ix] {
            Vertex::Node(n) => NodeId(Key {
                serial: n.serial,
                index: ix.index() as u32,
            }),
            Vertex::Value(_) => unreachable!("edges alternate between values and nodes"),
        }
    }

    fn value_id_at(&self, ix: NodeIndex) -> ValueId {
        match &self.g[ix] {
            Vertex::Value(v) => ValueId(Key {
                serial: v.serial,
                index: ix.index() as u32,
            }),
            Vertex::Node(_) => unreachable!("edges alternate between values and nodes"),
        }
    }

    // ----- lookups -----

    pub fn try_node(&self, id: NodeId) -> Result<&Node, IrError> {
        let ix = self.index_of_node(id)?;
        match &self.g[ix] {
            Vertex::Node(n) => Ok(n),
            Vertex::Value(_) => Err(IrError::StaleNode(id)),
        }
    }

    pub fn try_value(&self, id: ValueId) -> Result<&Value, IrError> {
        let ix = self.index_of_value(id)?;
        match &self.g[ix] {
            Vertex::Value(v) => Ok(v),
            Vertex::Node(_) => Err(IrError::StaleValue(id)),
        }
    }

    /// The node behind `id`. Panics on a stale id: holding an id across its
    /// removal is a bug in the caller, never a property of the input.
    pub fn node(&self, id: NodeId) -> &Node {
        match self.try_node(id) {
            Ok(n) => n,
            Err(e) => panic!("{e}"),
        }
    }

    /// The value behind `id`. Panics on a stale id (see [`Graph::node`]).
    pub fn value(&self, id: ValueId) -> &Value {
        match self.try_value(id) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    /// Mutable access to a node's free-form fields (op type, attributes,
    /// docs); names and connections change only through the graph.
    pub fn node_mut(&mut self, id: NodeId) -> Result<&mut Node, IrError> {
        let ix = self.index_of_node(id)?;
        match &mut self.g[ix] {
            Vertex::Node(n) => Ok(n),
            Vertex::Value(_) => Err(IrError::StaleNode(id)),
        }
    }

    /// Mutable access to a value's free-form fields (type, docs).
    pub fn value_mut(&mut self, id: ValueId) -> Result<&mut Value, IrError> {
        let ix = self.index_of_value(id)?;
        match &mut self.g[ix] {
            Vertex::Value(v) => Ok(v),
            Vertex::Node(_) => Err(IrError::StaleValue(id)),
        }
    }

    pub fn contains_node(&self, id: NodeId) -> bool {
        self.index_of_node(id).is_ok()
    }

    pub fn contains_value(&self, id: ValueId) -> bool {
        self.index_of_value(id).is_ok()
    }

    pub fn value_by_name(&self, name: &str) -> Option<ValueId> {
        self.value_names.get(name).copied()
    }

    pub fn node_by_name(&self, name: &str) -> Option<NodeId> {
        self.node_names.get(name).copied()
    }

    pub fn inputs(&self) -> &[ValueId] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[ValueId] {
        &self.outputs
    }

    pub fn node_count(&self) -> usize {
        // Every vertex is a value (all of them are in the name index) or a node.
        self.g.node_count() - self.value_names.len()
    }

    pub fn value_count(&self) -> usize {
        self.value_names.len()
    }

    /// All node ids, in creation order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self
            .g
            .node_indices()
            .filter(|&ix| matches!(self.g[ix], Vertex::Node(_)))
            .map(|ix| self.node_id_at(ix))
            .collect();
        ids.sort();
        ids
    }

    /// All value ids, in creation order.
    pub fn value_ids(&self) -> Vec<ValueId> {
        let mut ids: Vec<ValueId> = self.value_names.values().copied().collect();
        ids.sort();
        ids
    }

    /// The values holding initializer data, in creation order.
    pub fn initializers(&self) -> Vec<ValueId> {
        self.value_ids()
            .into_iter()
            .filter(|&v| self.value(v).init.is_some())
            .collect()
    }

    pub fn initializer(&self, v: ValueId) -> Option<&Initializer> {
        self.try_value(v).ok()?.init.as_deref()
    }

    /// Replace an initializer's data in place (the value stays defined).
    pub fn initializer_mut(&mut self, v: ValueId) -> Result<Option<&mut Initializer>, IrError> {
        Ok(self.value_mut(v)?.init.as_deref_mut())
    }

    /// The node and output slot producing `v`, if a node does.
    pub fn producer(&self, v: ValueId) -> Option<(NodeId, usize)> {
        let ix = self.index_of_value(v).ok()?;
        let e = self.g.edges_directed(ix, Incoming).next()?;
        Some((self.node_id_at(e.source()), *e.weight() as usize))
    }

    /// The nodes and input slots reading `v`, by node creation order then slot.
    pub fn consumers(&self, v: ValueId) -> Vec<(NodeId, usize)> {
        let Ok(ix) = self.index_of_value(v) else {
            return Vec::new();
        };
        let mut uses: Vec<(NodeId, usize)> = self
            .g
            .edges_directed(ix, Outgoing)
            .map(|e| (self.node_id_at(e.target()), *e.weight() as usize))
            .collect();
        uses.sort();
        uses
    }

    /// Whether a node reads `v` or the graph returns it.
    pub fn is_used(&self, v: ValueId) -> bool {
        self.try_value(v).is_ok_and(|val| val.is_output)
            || self
                .index_of_value(v)
                .is_ok_and(|ix| self.g.edges_directed(ix, Outgoing).next().is_some())
    }

    pub fn definition(&self, v: ValueId) -> ValueDef {
        let Ok(val) = self.try_value(v) else {
            return ValueDef::Undefined;
        };
        if val.is_input {
            ValueDef::Input
        } else if val.init.is_some() {
            ValueDef::Initializer
        } else if val.captured {
            ValueDef::Captured
        } else if let Some((n, slot)) = self.producer(v) {
            ValueDef::Node(n, slot)
        } else {
            ValueDef::Undefined
        }
    }

    /// A short description of a node for messages: `node 'Conv_3' (Conv)`,
    /// or for an unnamed one, the value it produces.
    pub fn describe_node(&self, id: NodeId) -> String {
        let Ok(n) = self.try_node(id) else {
            return format!("{id:?}");
        };
        let op = if n.domain.is_empty() {
            n.op_type.clone()
        } else {
            format!("{}.{}", n.domain, n.op_type)
        };
        if !n.name.is_empty() {
            return format!("node '{}' ({op})", n.name);
        }
        match n.outputs.iter().flatten().next() {
            Some(&o) => format!("unnamed {op} node producing '{}'", self.value(o).name),
            None => format!("unnamed {op} node"),
        }
    }

    // ----- mutation -----

    fn insert_value(&mut self, name: String, mut value: Value) -> Result<ValueId, IrError> {
        if self.value_names.contains_key(&name) {
            return Err(IrError::DuplicateValueName(name));
        }
        value.serial = self.next_serial();
        value.name = name.clone();
        let serial = value.serial;
        let ix = self.g.add_node(Vertex::Value(value));
        let id = ValueId(Key {
            serial,
            index: ix.index() as u32,
        });
        self.value_names.insert(name, id);
        Ok(id)
    }

    fn blank_value(ty: Option<ValueType>) -> Value {
        Value {
            name: String::new(),
            serial: 0,
            ty,
            doc: String::new(),
            meta: Metadata::new(),
            init: None,
            is_input: false,
            is_output: false,
            captured: false,
        }
    }

    /// Adds a value that nothing defines yet: give it to a node as an output.
    pub fn add_value(
        &mut self,
        name: impl Into<String>,
        ty: Option<ValueType>,
    ) -> Result<ValueId, IrError> {
        self.insert_value(name.into(), Graph::blank_value(ty))
    }

    /// Adds a graph input (appended to the input list).
    pub fn add_input(
        &mut self,
        name: impl Into<String>,
        ty: Option<ValueType>,
    ) -> Result<ValueId, IrError> {
        let mut v = Graph::blank_value(ty);
        v.is_input = true;
        let id = self.insert_value(name.into(), v)?;
        self.inputs.push(id);
        Ok(id)
    }

    /// Adds an initializer (constant data).
    pub fn add_initializer(
        &mut self,
        name: impl Into<String>,
        tensor: Tensor,
    ) -> Result<ValueId, IrError> {
        let mut v = Graph::blank_value(None);
        v.init = Some(Box::new(Initializer {
            tensor,
            doc: String::new(),
            meta: Metadata::new(),
        }));
        self.insert_value(name.into(), v)
    }

    /// Adds a value that an enclosing graph defines (subgraphs only).
    pub fn add_captured(&mut self, name: impl Into<String>) -> Result<ValueId, IrError> {
        let mut v = Graph::blank_value(None);
        v.captured = true;
        self.insert_value(name.into(), v)
    }

    /// Sets or clears the initializer data of a value that no node produces.
    pub fn set_initializer(
        &mut self,
        v: ValueId,
        init: Option<Initializer>,
    ) -> Result<(), IrError> {
        if let Some((n, _)) = self.producer(v) {
            return Err(IrError::BadRole {
                value: self.value(v).name.clone(),
                what: "an initializer",
                why: if self.contains_node(n) {
                    "produced by a node"
                } else {
                    "produced"
                },
            });
        }
        let val = self.value_mut(v)?;
        if val.captured {
            return Err(IrError::BadRole {
                value: val.name.clone(),
                what: "an initializer",
                why: "captured from an enclosing graph",
            });
        }
        val.init = init.map(Box::new);
        Ok(())
    }

    /// Records a declared type. For an initializer, a declaration equal to the
    /// tensor's own type adds nothing and is not stored, so the IR has one
    /// form for one meaning (and the text form can print it unambiguously).
    pub fn declare_type(&mut self, v: ValueId, ty: Option<ValueType>) -> Result<(), IrError> {
        let val = self.value_mut(v)?;
        let redundant = match (&ty, &val.init) {
            (Some(ValueType::Tensor(t)), Some(init)) => {
                *t == crate::TensorType::of_concrete(init.tensor.dtype(), init.tensor.shape())
            }
            _ => false,
        };
        val.ty = if redundant { None } else { ty };
        Ok(())
    }

    /// Replaces the graph input list. Inputs may not be node outputs or
    /// captured values.
    pub fn set_inputs(&mut self, inputs: Vec<ValueId>) -> Result<(), IrError> {
        let mut seen = HashSet::new();
        for &v in &inputs {
            let val = self.try_value(v)?;
            if !seen.insert(v) {
                return Err(IrError::BadRole {
                    value: val.name.clone(),
                    what: "a graph input",
                    why: "listed twice",
                });
            }
            if self.producer(v).is_some() {
                return Err(IrError::BadRole {
                    value: val.name.clone(),
                    what: "a graph input",
                    why: "produced by a node",
                });
            }
            if val.captured {
                return Err(IrError::BadRole {
                    value: val.name.clone(),
                    what: "a graph input",
                    why: "captured from an enclosing graph",
                });
            }
        }
        for old in std::mem::take(&mut self.inputs) {
            if let Ok(val) = self.value_mut(old) {
                val.is_input = false;
            }
        }
        for &v in &inputs {
            self.value_mut(v)?.is_input = true;
        }
        self.inputs = inputs;
        Ok(())
    }

    /// Replaces the graph output list.
    pub fn set_outputs(&mut self, outputs: Vec<ValueId>) -> Result<(), IrError> {
        for &v in &outputs {
            self.try_value(v)?;
        }
        for old in std::mem::take(&mut self.outputs) {
            if let Ok(val) = self.value_mut(old) {
                val.is_output = false;
            }
        }
        for &v in &outputs {
            self.value_mut(v)?.is_output = true;
        }
        self.outputs = outputs;
        Ok(())
    }

    /// Adds a node. Its outputs must be values that nothing defines yet.
    pub fn add_node(&mut self, new: NewNode) -> Result<NodeId, IrError> {
        if !new.name.is_empty() && self.node_names.contains_key(&new.name) {
            return Err(IrError::DuplicateNodeName(new.name));
        }
        for v in new.inputs.iter().flatten() {
            self.index_of_value(*v)?;
        }
        let mut seen = HashSet::new();
        for &v in new.outputs.iter().flatten() {
            let val = self.try_value(v)?;
            if !seen.insert(v) {
                return Err(IrError::RepeatedOutput {
                    value: val.name.clone(),
                });
            }
            self.check_producible(v)?;
        }
        let serial = self.next_serial();
        let node = Node {
            name: new.name.clone(),
            serial,
            op_type: new.op_type,
            domain: new.domain,
            overload: new.overload,
            attrs: new.attrs,
            doc: new.doc,
            meta: new.meta,
            inputs: new.inputs.clone(),
            outputs: new.outputs.clone(),
        };
        let nix = self.g.add_node(Vertex::Node(node));
        for (slot, v) in new.inputs.iter().enumerate() {
            if let Some(v) = v {
                let vix = self.index_of_value(*v)?;
                self.g.add_edge(vix, nix, slot as u32);
            }
        }
        for (slot, v) in new.outputs.iter().enumerate() {
            if let Some(v) = v {
                let vix = self.index_of_value(*v)?;
                self.g.add_edge(nix, vix, slot as u32);
            }
        }
        let id = NodeId(Key {
            serial,
            index: nix.index() as u32,
        });
        if !new.name.is_empty() {
            self.node_names.insert(new.name, id);
        }
        Ok(id)
    }

    /// Fails unless `v` may become a node's output: nothing produces it and
    /// it is no graph input, initializer or captured value.
    fn check_producible(&self, v: ValueId) -> Result<(), IrError> {
        let val = self.try_value(v)?;
        if let Some((p, _)) = self.producer(v) {
            return Err(IrError::AlreadyProduced {
                value: val.name.clone(),
                by: self.describe_node(p),
            });
        }
        let what = if val.is_input {
            Some("a graph input")
        } else if val.init.is_some() {
            Some("an initializer")
        } else if val.captured {
            Some("captured from an enclosing graph")
        } else {
            None
        };
        match what {
            Some(what) => Err(IrError::NotProducible {
                value: val.name.clone(),
                what,
            }),
            None => Ok(()),
        }
    }

    /// Makes output `slot` of a node define `value` instead (which nothing
    /// may produce yet); the value it defined before is left unproduced.
    /// This is how a rewrite keeps a value's name, e.g. a graph output's,
    /// when another node takes over computing it.
    pub fn set_node_output(
        &mut self,
        node: NodeId,
        slot: usize,
        value: ValueId,
    ) -> Result<(), IrError> {
        let nix = self.index_of_node(node)?;
        if slot >= self.node(node).outputs.len() {
            return Err(IrError::NoSuchSlot {
                node: self.describe_node(node),
                slot,
            });
        }
        self.check_producible(value)?;
        let old_edge = self
            .g
            .edges_directed(nix, Outgoing)
            .find(|e| *e.weight() as usize == slot)
            .map(|e| e.id());
        if let Some(e) = old_edge {
            self.g.remove_edge(e);
        }
        let vix = self.index_of_value(value)?;
        self.g.add_edge(nix, vix, slot as u32);
        if let Vertex::Node(n) = &mut self.g[nix] {
            n.outputs[slot] = Some(value);
        }
        Ok(())
    }

    /// Removes a node. Its output values stay, defined by nothing until a new
    /// producer is added or they are removed.
    pub fn remove_node(&mut self, id: NodeId) -> Result<Node, IrError> {
        let ix = self.index_of_node(id)?;
        let Some(Vertex::Node(n)) = self.g.remove_node(ix) else {
            unreachable!("index_of_node checked the vertex kind");
        };
        if !n.name.is_empty() {
            self.node_names.remove(&n.name);
        }
        Ok(n)
    }

    /// Removes a value that no node reads or produces and that is neither a
    /// graph input nor a graph output.
    pub fn remove_value(&mut self, id: ValueId) -> Result<Value, IrError> {
        let ix = self.index_of_value(id)?;
        let val = self.value(id);
        let mut uses = Vec::new();
        if let Some((p, _)) = self.producer(id) {
            uses.push(format!("produced by {}", self.describe_node(p)));
        }
        for (c, slot) in self.consumers(id) {
            uses.push(format!("input {slot} of {}", self.describe_node(c)));
        }
        if val.is_input {
            uses.push("a graph input".into());
        }
        if val.is_output {
            uses.push("a graph output".into());
        }
        if !uses.is_empty() {
            return Err(IrError::InUse {
                value: val.name.clone(),
                uses: uses.join(", "),
            });
        }
        let Some(Vertex::Value(v)) = self.g.remove_node(ix) else {
            unreachable!("index_of_value checked the vertex kind");
        };
        self.value_names.remove(&v.name);
        Ok(v)
    }

    /// Points input `slot` of a node at another value (or at nothing).
    pub fn set_node_input(
        &mut self,
        node: NodeId,
        slot: usize,
        value: Option<ValueId>,
    ) -> Result<(), IrError> {
        let nix = self.index_of_node(node)?;
        if let Some(v) = value {
            self.index_of_value(v)?;
        }
        let n_inputs = self.node(node).inputs.len();
        if slot >= n_inputs {
            return Err(IrError::NoSuchSlot {
                node: self.describe_node(node),
                slot,
            });
        }
        let old_edge = self
            .g
            .edges_directed(nix, Incoming)
            .find(|e| *e.weight() as usize == slot)
            .map(|e| e.id());
        if let Some(e) = old_edge {
            self.g.remove_edge(e);
        }
        if let Some(v) = value {
            let vix = self.index_of_value(v)?;
            self.g.add_edge(vix, nix, slot as u32);
        }
        if let Vertex::Node(n) = &mut self.g[nix] {
            n.inputs[slot] = value;
        }
        Ok(())
    }

    /// Appends an input to a node.
    pub fn push_node_input(&mut self, node: NodeId, value: Option<ValueId>) -> Result<(), IrError> {
        let nix = self.index_of_node(node)?;
        if let Vertex::Node(n) = &mut self.g[nix] {
            n.inputs.push(None);
        }
        let slot = self.node(node).inputs.len() - 1;
        self.set_node_input(node, slot, value)
    }

    /// Makes every reader of `old` (node inputs and graph outputs) read `new`.
    pub fn replace_uses(&mut self, old: ValueId, new: ValueId) -> Result<(), IrError> {
        self.index_of_value(old)?;
        self.index_of_value(new)?;
        for (n, slot) in self.consumers(old) {
            self.set_node_input(n, slot, Some(new))?;
        }
        if self.value(old).is_output {
            let outputs = self
                .outputs
                .iter()
                .map(|&o| if o == old { new } else { o })
                .collect();
            self.set_outputs(outputs)?;
        }
        Ok(())
    }

    pub fn rename_value(&mut self, v: ValueId, name: impl Into<String>) -> Result<(), IrError> {
        let name = name.into();
        let old = self.try_value(v)?.name.clone();
        if old == name {
            return Ok(());
        }
        if self.value_names.contains_key(&name) {
            return Err(IrError::DuplicateValueName(name));
        }
        self.value_names.remove(&old);
        self.value_names.insert(name.clone(), v);
        self.value_mut(v)?.name = name;
        Ok(())
    }

    pub fn rename_node(&mut self, n: NodeId, name: impl Into<String>) -> Result<(), IrError> {
        let name = name.into();
        let old = self.try_node(n)?.name.clone();
        if old == name {
            return Ok(());
        }
        if !name.is_empty() && self.node_names.contains_key(&name) {
            return Err(IrError::DuplicateNodeName(name));
        }
        if !old.is_empty() {
            self.node_names.remove(&old);
        }
        if !name.is_empty() {
            self.node_names.insert(name.clone(), n);
        }
        self.node_mut(n)?.name = name;
        Ok(())
    }

    /// `base` if no value has that name, else `base_1`, `base_2`, ...
    pub fn unique_value_name(&self, base: &str) -> String {
        unique_name(base, |n| self.value_names.contains_key(n))
    }

    /// `base` if no node has that name, else `base_1`, `base_2`, ...
    pub fn unique_node_name(&self, base: &str) -> String {
        unique_name(base, |n| self.node_names.contains_key(n))
    }

    // ----- order -----

    /// Names this graph reads from enclosing scopes: its captured values and
    /// those its subgraphs capture that it does not define itself.
    pub fn captured_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for v in self.value_ids() {
            if self.value(v).captured {
                names.push(self.value(v).name.clone());
            }
        }
        for n in self.node_ids() {
            for name in self.subgraph_captures(n) {
                if self.value_by_name(&name).is_none() {
                    names.push(name);
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }

    /// Names the subgraphs of node `n` read from outside themselves.
    pub fn subgraph_captures(&self, n: NodeId) -> Vec<String> {
        self.node(n)
            .attrs
            .iter()
            .flat_map(|a| a.value.subgraphs())
            .flat_map(|g| g.captured_names())
            .collect()
    }

    /// The nodes in a topological order. Among nodes ready at the same time,
    /// the one created first comes first, so a graph read from a sorted file
    /// keeps the file's order. A node holding subgraphs also waits for the
    /// producers of the values those subgraphs capture.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, Cycle> {
        let ids = self.node_ids();
        let mut waiting: HashMap<NodeId, usize> = HashMap::with_capacity(ids.len());
        let mut dependents: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
        for &n in &ids {
            let mut preds: Vec<NodeId> = self
                .node(n)
                .inputs
                .iter()
                .flatten()
                .filter_map(|&v| self.producer(v).map(|(p, _)| p))
                .collect();
            for name in self.subgraph_captures(n) {
                if let Some(p) = self.value_by_name(&name).and_then(|v| self.producer(v)) {
                    preds.push(p.0);
                }
            }
            preds.sort();
            preds.dedup();
            waiting.insert(n, preds.len());
            for p in preds {
                dependents.entry(p).or_default().push(n);
            }
        }
        let mut ready: BinaryHeap<Reverse<NodeId>> = ids
            .iter()
            .filter(|n| waiting[n] == 0)
            .map(|&n| Reverse(n))
            .collect();
        let mut order = Vec::with_capacity(ids.len());
        while let Some(Reverse(n)) = ready.pop() {
            order.push(n);
            for &d in dependents.get(&n).map(Vec::as_slice).unwrap_or(&[]) {
                let w = waiting.get_mut(&d).expect("every node has a count");
                *w -= 1;
                if *w == 0 {
                    ready.push(Reverse(d));
                }
            }
        }
        if order.len() == ids.len() {
            Ok(order)
        } else {
            // Nodes left are on a cycle or downstream of one; peel off the
            // downstream ones (no dependent left) so the report names the cycle.
            let mut stuck: HashSet<NodeId> = ids.into_iter().filter(|n| waiting[n] > 0).collect();
            loop {
                let tails: Vec<NodeId> = stuck
                    .iter()
                    .copied()
                    .filter(|n| {
                        !dependents
                            .get(n)
                            .is_some_and(|ds| ds.iter().any(|d| stuck.contains(d)))
                    })
                    .collect();
                if tails.is_empty() {
                    break;
                }
                for t in tails {
                    stuck.remove(&t);
                }
            }
            let mut nodes: Vec<NodeId> = stuck.into_iter().collect();
            nodes.sort();
            Err(Cycle { nodes })
        }
    }

    /// Checks that the edges mirror the nodes' input and output lists and the
    /// name maps mirror the vertices. Cheap; the verifier runs it first.
    pub(crate) fn check_links(&self) -> Result<(), String> {
        let mut values = 0usize;
        for ix in self.g.node_indices() {
            match &self.g[ix] {
                Vertex::Value(v) => {
                    values += 1;
                    if self.value_names.get(&v.name) != Some(&self.value_id_at(ix)) {
                        return Err(format!("value '{}' is missing from the name index", v.name));
                    }
                    if self.g.edges_directed(ix, Incoming).count() > 1 {
                        return Err(format!("value '{}' is produced more than once", v.name));
                    }
                }
                Vertex::Node(n) => {
                    let id = self.node_id_at(ix);
                    if !n.name.is_empty() && self.node_names.get(&n.name) != Some(&id) {
                        return Err(format!("node '{}' is missing from the name index", n.name));
                    }
                    let mut ins: Vec<(usize, ValueId)> = self
                        .g
                        .edges_directed(ix, Incoming)
                        .map(|e| (*e.weight() as usize, self.value_id_at(e.source())))
                        .collect();
                    ins.sort();
                    let want: Vec<(usize, ValueId)> = n
                        .inputs
                        .iter()
                        .enumerate()
                        .filter_map(|(i, v)| v.map(|v| (i, v)))
                        .collect();
                    let mut outs: Vec<(usize, ValueId)> = self
                        .g
                        .edges_directed(ix, Outgoing)
                        .map(|e| (*e.weight() as usize, self.value_id_at(e.target())))
                        .collect();
                    outs.sort();
                    let want_out: Vec<(usize, ValueId)> = n
                        .outputs
                        .iter()
                        .enumerate()
                        .filter_map(|(i, v)| v.map(|v| (i, v)))
                        .collect();
                    if ins != want || outs != want_out {
                        return Err(format!(
                            "{} has edges that disagree with its input/output lists",
                            self.describe_node(id)
                        ));
                    }
                }
            }
        }
        if values != self.value_names.len() {
            return Err("the value name index lists removed values".into());
        }
        Ok(())
    }
}

fn unique_name(base: &str, taken: impl Fn(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_string();
    }
    (1..)
        .map(|i| format!("{base}_{i}"))
        .find(|n| !taken(n))
        .expect("an unbounded range finds a free name")
}

/// Structural equality: same header, same inputs and outputs (by name), same
/// values (by name, with their types, docs and data) and the same nodes in
/// topological order, with inputs and outputs compared by name. Ids and
/// serial numbers do not matter.
impl PartialEq for Graph {
    fn eq(&self, other: &Graph) -> bool {
        let names = |g: &Graph, ids: &[ValueId]| -> Vec<String> {
            ids.iter().map(|&v| g.value(v).name.clone()).collect()
        };
        if self.name != other.name
            || self.doc != other.doc
            || self.meta != other.meta
            || self.quantization_annotations != other.quantization_annotations
            || names(self, &self.inputs) != names(other, &other.inputs)
            || names(self, &self.outputs) != names(other, &other.outputs)
            || self.value_count() != other.value_count()
        {
            return false;
        }
        for v in self.value_ids() {
            let a = self.value(v);
            let Some(w) = other.value_by_name(&a.name) else {
                return false;
            };
            let b = other.value(w);
            if a.ty != b.ty
                || a.doc != b.doc
                || a.meta != b.meta
                || a.init != b.init
                || a.captured != b.captured
            {
                return false;
            }
        }
        let order = |g: &Graph| g.topo_order().unwrap_or_else(|_| g.node_ids());
        let (xs, ys) = (order(self), order(other));
        if xs.len() != ys.len() {
            return false;
        }
        let value_names = |g: &Graph, vs: &[Option<ValueId>]| -> Vec<Option<String>> {
            vs.iter()
                .map(|v| v.map(|v| g.value(v).name.clone()))
                .collect()
        };
        xs.iter().zip(&ys).all(|(&x, &y)| {
            let (a, b) = (self.node(x), other.node(y));
            a.name == b.name
                && a.op_type == b.op_type
                && a.domain == b.domain
                && a.overload == b.overload
                && a.attrs == b.attrs
                && a.doc == b.doc
                && a.meta == b.meta
                && value_names(self, &a.inputs) == value_names(other, &b.inputs)
                && value_names(self, &a.outputs) == value_names(other, &b.outputs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DataType, Dim};

    fn f32_type(dims: &[i64]) -> Option<ValueType> {
        Some(ValueType::tensor(
            DataType::F32,
            dims.iter().map(|&d| Dim::Known(d)).collect(),
        ))
    }

    /// x -> Relu -> y -> Neg -> z
    fn chain() -> (Graph, [ValueId; 3], [NodeId; 2]) {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_type(&[2])).unwrap();
        let y = g.add_value("y", None).unwrap();
        let z = g.add_value("z", None).unwrap();
        let relu = g
            .add_node(NewNode::new("Relu").named("relu").inputs([x]).outputs([y]))
            .unwrap();
        let neg = g
            .add_node(NewNode::new("Neg").named("neg").inputs([y]).outputs([z]))
            .unwrap();
        g.set_outputs(vec![z]).unwrap();
        (g, [x, y, z], [relu, neg])
    }

    #[test]
    fn producers_and_consumers_are_linked_both_ways() {
        let (g, [x, y, z], [relu, neg]) = chain();
        assert_eq!(g.producer(y), Some((relu, 0)));
        assert_eq!(g.consumers(y), vec![(neg, 0)]);
        assert_eq!(g.consumers(x), vec![(relu, 0)]);
        assert_eq!(g.producer(x), None);
        assert_eq!(g.definition(x), ValueDef::Input);
        assert_eq!(g.definition(z), ValueDef::Node(neg, 0));
        assert_eq!(g.topo_order().unwrap(), vec![relu, neg]);
        g.check_links().unwrap();
    }

    #[test]
    fn a_stale_id_is_refused_even_when_its_slot_is_reused() {
        let (mut g, [_, y, _], [relu, _]) = chain();
        g.remove_node(relu).unwrap();
        // The freed slot is reused by the next vertex added.
        let w = g.add_initializer("w", Tensor::scalar_f32(1.0)).unwrap();
        assert!(g.try_node(relu).is_err());
        assert!(g.contains_value(w));
        assert_eq!(g.producer(y), None);
        assert!(matches!(g.node_mut(relu), Err(IrError::StaleNode(_))));
        g.check_links().unwrap();
    }

    #[test]
    fn outputs_cannot_be_produced_twice_or_be_inputs() {
        let (mut g, [x, y, _], _) = chain();
        let e = g
            .add_node(NewNode::new("Relu").inputs([x]).outputs([y]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "value 'y' is already produced by node 'relu' (Relu)"
        );
        let e = g
            .add_node(NewNode::new("Relu").inputs([y]).outputs([x]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "value 'x' cannot be a node output: it is a graph input"
        );
        assert!(matches!(
            g.add_value("x", None),
            Err(IrError::DuplicateValueName(_))
        ));
        let e = g.add_node(NewNode::new("Relu").named("relu")).unwrap_err();
        assert_eq!(e, IrError::DuplicateNodeName("relu".into()));
    }

    #[test]
    fn rewiring_keeps_edges_and_lists_in_step() {
        let (mut g, [x, y, z], [relu, neg]) = chain();
        // Bypass the Relu: Neg reads x directly, then drop the Relu and y.
        g.replace_uses(y, x).unwrap();
        assert_eq!(g.consumers(x), vec![(relu, 0), (neg, 0)]);
        g.remove_node(relu).unwrap();
        assert!(g.remove_value(y).is_ok());
        assert_eq!(g.node(neg).inputs(), &[Some(x)]);
        assert_eq!(g.topo_order().unwrap(), vec![neg]);
        let e = g.remove_value(z).unwrap_err();
        assert!(e.to_string().contains("a graph output"), "{e}");
        g.check_links().unwrap();
    }

    #[test]
    fn cycles_are_reported_with_their_nodes() {
        let mut g = Graph::new("g");
        let a = g.add_value("a", None).unwrap();
        let b = g.add_value("b", None).unwrap();
        let n1 = g
            .add_node(NewNode::new("Neg").named("n1").inputs([b]).outputs([a]))
            .unwrap();
        let n2 = g
            .add_node(NewNode::new("Neg").named("n2").inputs([a]).outputs([b]))
            .unwrap();
        assert_eq!(g.topo_order().unwrap_err().nodes, vec![n1, n2]);
    }

    #[test]
    fn topo_order_prefers_creation_order_among_ready_nodes() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", None).unwrap();
        let late = g.add_value("late", None).unwrap();
        let early = g.add_value("early", None).unwrap();
        let sum = g.add_value("sum", None).unwrap();
        // Created out of order: the consumer first.
        let add = g
            .add_node(NewNode::new("Add").inputs([late, early]).outputs([sum]))
            .unwrap();
        let b = g
            .add_node(NewNode::new("Neg").inputs([x]).outputs([early]))
            .unwrap();
        let a = g
            .add_node(NewNode::new("Relu").inputs([x]).outputs([late]))
            .unwrap();
        assert_eq!(g.topo_order().unwrap(), vec![b, a, add]);
    }

    #[test]
    fn redundant_initializer_declarations_are_not_stored() {
        let mut g = Graph::new("g");
        let w = g
            .add_initializer("w", Tensor::f32(&[2], vec![1.0, 2.0]).unwrap())
            .unwrap();
        g.declare_type(w, f32_type(&[2])).unwrap();
        assert_eq!(g.value(w).ty, None);
        let sym = Some(ValueType::tensor(
            DataType::F32,
            vec![Dim::Symbol("N".into())],
        ));
        g.declare_type(w, sym.clone()).unwrap();
        assert_eq!(g.value(w).ty, sym);
    }

    #[test]
    fn unique_names_skip_taken_ones() {
        let (g, _, _) = chain();
        assert_eq!(g.unique_value_name("y"), "y_1");
        assert_eq!(g.unique_value_name("fresh"), "fresh");
        assert_eq!(g.unique_node_name("relu"), "relu_1");
    }

    #[test]
    fn structural_equality_ignores_ids() {
        let (a, _, _) = chain();
        let (mut b, _, _) = chain();
        assert_eq!(a, b);
        let n = b.node_by_name("neg").unwrap();
        b.node_mut(n).unwrap().op_type = "Abs".into();
        assert_ne!(a, b);
    }
}
