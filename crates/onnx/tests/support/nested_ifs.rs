//! A model whose subgraphs nest as deep as asked: for the reader's
//! recursion limit, in this crate's tests and the command's
//! (`crates/cli/tests/reliability.rs` includes this file).

use qgraph_ir::{AttrValue, DataType, Graph, Model, NewNode, TensorType, ValueType};

/// A model whose `If` nodes nest `depth` deep: each then-branch holds the
/// next `If`, the innermost an `Identity`; every else-branch is an
/// `Identity`.
pub fn nested_ifs(depth: usize) -> Model {
    fn identity(name: &str) -> Graph {
        let mut g = Graph::new(name);
        let c = g.add_captured("c").unwrap();
        let out = g.add_value(format!("{name}_out"), None).unwrap();
        g.add_node(NewNode::new("Identity").inputs([c]).outputs([out]))
            .unwrap();
        g.set_outputs(vec![out]).unwrap();
        g
    }
    /// The graph at `level` (the main graph is level 0).
    fn at_level(level: usize, depth: usize) -> Graph {
        if level == depth {
            return identity(&format!("then{level}"));
        }
        let mut g = Graph::new(format!("then{level}"));
        let c = if level == 0 {
            g.add_input(
                "c",
                Some(ValueType::Tensor(TensorType::new(DataType::Bool, vec![]))),
            )
            .unwrap()
        } else {
            g.add_captured("c").unwrap()
        };
        let out = g.add_value(format!("y{level}"), None).unwrap();
        g.add_node(
            NewNode::new("If")
                .named(format!("if{}", level + 1))
                .inputs([c])
                .outputs([out])
                .attr(
                    "then_branch",
                    AttrValue::Graph(Box::new(at_level(level + 1, depth))),
                )
                .attr(
                    "else_branch",
                    AttrValue::Graph(Box::new(identity(&format!("else{}", level + 1)))),
                ),
        )
        .unwrap();
        g.set_outputs(vec![out]).unwrap();
        g
    }
    let model = Model::new(at_level(0, depth), 17);
    qgraph_ir::verify_model(&model).unwrap();
    model
}
