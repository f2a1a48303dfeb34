//! Small graph queries and edits every pass needs. Not a pass: passes
//! share these instead of importing each other.

use qgraph_ir::{Graph, Initializer, NodeId, Tensor, ValueId};

/// The nodes in topological order, or the error every pass reports.
pub(crate) fn order(g: &Graph) -> Result<Vec<NodeId>, String> {
    g.topo_order()
        .map_err(|_| "the graph has a cycle".to_string())
}

/// The tensor of a value fixed before the run: an initializer with data
/// that is no graph input (such an initializer is a default the caller may
/// override).
pub(crate) fn constant(g: &Graph, v: Option<ValueId>) -> Option<&Tensor> {
    let val = g.value(v?);
    if val.is_graph_input() {
        return None;
    }
    val.initializer()
        .map(|i| &i.tensor)
        .filter(|t| !t.is_elided())
}

/// Makes a value that nothing produces hold `tensor`; the tensor carries
/// its own type, so any declared type is dropped.
pub(crate) fn set_constant(g: &mut Graph, v: ValueId, tensor: Tensor) -> Result<(), String> {
    g.set_initializer(
        v,
        Some(Initializer {
            tensor,
            doc: String::new(),
            meta: Default::default(),
        }),
    )
    .map_err(|e| e.to_string())?;
    g.declare_type(v, None).map_err(|e| e.to_string())
}
