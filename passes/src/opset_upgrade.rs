//! Raising a model's default-domain opset import, for rewrites that need a
//! newer operator version (int4 DequantizeLinear needs 21). Not a version
//! converter: the import is raised only when every operator the model uses
//! means the same at both versions, which from opset 13 holds for all but
//! the few whose inputs or defaults changed (listed below, with the version
//! of the change); a model using one of them is refused, naming it.

use qgraph_ir::Model;

/// Operators whose reading changed after opset 13, and the version that
/// changed it.
const CHANGED_SINCE_13: &[(&str, i64, &str)] = &[
    ("ReduceMean", 18, "axes became an input"),
    ("ReduceMax", 18, "axes became an input"),
    ("ReduceMin", 18, "axes became an input"),
    ("ReduceProd", 18, "axes became an input"),
    ("ReduceL1", 18, "axes became an input"),
    ("ReduceL2", 18, "axes became an input"),
    ("ReduceLogSum", 18, "axes became an input"),
    ("ReduceLogSumExp", 18, "axes became an input"),
    ("ReduceSumSquare", 18, "axes became an input"),
    (
        "RoiAlign",
        16,
        "the default coordinate_transformation_mode changed",
    ),
];

/// The oldest import this module raises from: before 13 Squeeze, Unsqueeze,
/// Split, ReduceSum and Softmax read differently, among others.
const OLDEST: i64 = 13;

/// Raises the default-domain import of `model` (main graph, subgraphs and
/// functions) to `target`.
pub(crate) fn raise_default_opset(model: &mut Model, target: i64) -> Result<(), String> {
    if let Some(why) = opset_raise_blocker(model, target) {
        return Err(why);
    }
    model.set_opset_version("", target);
    Ok(())
}

/// Why the default-domain import of `model` cannot be raised to `target`,
/// or `None` when it can (or is there already).
pub fn opset_raise_blocker(model: &Model, target: i64) -> Option<String> {
    let current = model.opset_version("").unwrap_or(1);
    if current >= target {
        return None;
    }
    if current < OLDEST {
        return Some(format!(
            "this needs opset {target}, and the model imports opset {current}: \
             raising an import older than {OLDEST} is not supported"
        ));
    }
    let g = &model.graph;
    for n in g.node_ids() {
        let node = g.node(n);
        if !node.domain.is_empty() {
            continue;
        }
        if let Some((op, version, why)) = CHANGED_SINCE_13
            .iter()
            .find(|(op, v, _)| *op == node.op_type && *v > current && *v <= target)
        {
            return Some(format!(
                "this needs opset {target}, and {} ({op}) reads differently from opset \
                 {version} ({why}); the model imports opset {current}",
                g.describe_node(n)
            ));
        }
    }
    None
}
