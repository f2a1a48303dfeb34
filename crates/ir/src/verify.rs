//! The verifier: the invariants every pass must keep and every reader must
//! establish. It reports the first violation, naming the node or value.

use crate::model::canonical_domain;
use crate::{AttrValue, Graph, Model, OpsetImport, ValueDef, ValueType};
use std::collections::HashSet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct VerifyError {
    pub message: String,
}

fn fail<T>(message: String) -> Result<T, VerifyError> {
    Err(VerifyError { message })
}

struct Scope<'a> {
    imports: &'a [OpsetImport],
    /// Model-local functions, as (domain, name): calling one needs no import.
    functions: &'a [(String, String)],
}

/// Verifies a whole model: opset imports, the main graph with its subgraphs,
/// and each function body.
pub fn verify_model(model: &Model) -> Result<(), VerifyError> {
    check_imports(&model.opset_imports, "the model")?;
    let functions: Vec<(String, String)> = model
        .functions
        .iter()
        .map(|f| (f.domain.clone(), f.name.clone()))
        .collect();
    let mut seen = HashSet::new();
    for f in &model.functions {
        if !seen.insert((&f.domain, &f.name, &f.overload)) {
            return fail(format!(
                "function '{}' (domain '{}', overload '{}') is defined twice",
                f.name, f.domain, f.overload
            ));
        }
    }
    let scope = Scope {
        imports: &model.opset_imports,
        functions: &functions,
    };
    verify_graph(&model.graph, &scope, &[])?;
    for f in &model.functions {
        let what = format!("function '{}'", f.name);
        check_imports(&f.opset_imports, &what)?;
        let scope = Scope {
            imports: &f.opset_imports,
            functions: &functions,
        };
        verify_graph(&f.body, &scope, &[]).map_err(|e| VerifyError {
            message: format!("in {what}: {}", e.message),
        })?;
    }
    Ok(())
}

/// Verifies a top-level graph on its own, without checking domains.
pub fn verify_graph_alone(graph: &Graph) -> Result<(), VerifyError> {
    let imports: Vec<OpsetImport> = Vec::new();
    let scope = Scope {
        imports: &imports,
        functions: &[],
    };
    verify_graph_inner(graph, &scope, &[], false)
}

fn check_imports(imports: &[OpsetImport], owner: &str) -> Result<(), VerifyError> {
    let mut seen = HashSet::new();
    for o in imports {
        if !seen.insert(canonical_domain(&o.domain)) {
            return fail(format!(
                "{owner} imports domain '{}' twice (opset_import)",
                o.domain
            ));
        }
    }
    Ok(())
}

fn verify_graph(g: &Graph, scope: &Scope, outer: &[&Graph]) -> Result<(), VerifyError> {
    verify_graph_inner(g, scope, outer, true)
}

fn verify_graph_inner(
    g: &Graph,
    scope: &Scope,
    outer: &[&Graph],
    check_domains: bool,
) -> Result<(), VerifyError> {
    if let Err(e) = g.check_links() {
        return fail(format!("internal inconsistency: {e}"));
    }
    for v in g.value_ids() {
        let val = g.value(v);
        match g.definition(v) {
            ValueDef::Undefined => {
                if let Some(&(n, slot)) = g.consumers(v).first() {
                    return fail(format!(
                        "{}: input {slot} '{}' is not defined by any node, initializer or graph input",
                        g.describe_node(n),
                        val.name()
                    ));
                }
                if val.is_graph_output() {
                    return fail(format!(
                        "graph output '{}' is not defined by any node, initializer or graph input",
                        val.name()
                    ));
                }
                return fail(format!(
                    "value '{}' is neither defined nor used",
                    val.name()
                ));
            }
            ValueDef::Captured => {
                if outer.is_empty() {
                    return fail(format!(
                        "value '{}' is marked as taken from an enclosing graph, but this graph has none",
                        val.name()
                    ));
                }
                if !outer.iter().any(|o| o.value_by_name(val.name()).is_some()) {
                    return fail(format!(
                        "value '{}' is not defined here nor in any enclosing graph",
                        val.name()
                    ));
                }
            }
            ValueDef::Input | ValueDef::Initializer | ValueDef::Node(..) => {}
        }
        if let (Some(ty), Some(init)) = (&val.ty, val.initializer()) {
            let ok = match ty {
                ValueType::Tensor(t) => t.admits(init.tensor.dtype(), init.tensor.shape()),
                _ => false,
            };
            if !ok {
                return fail(format!(
                    "value '{}' is declared {ty} but its initializer is {}{}",
                    val.name(),
                    init.tensor.dtype(),
                    crate::ShapeFmt(init.tensor.shape())
                ));
            }
        }
    }
    let order = match g.topo_order() {
        Ok(order) => order,
        Err(cycle) => {
            let shown: Vec<String> = cycle
                .nodes
                .iter()
                .take(4)
                .map(|&n| g.describe_node(n))
                .collect();
            let more = cycle.nodes.len().saturating_sub(shown.len());
            let tail = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            return fail(format!(
                "the graph has a cycle through {}{tail}",
                shown.join(", ")
            ));
        }
    };
    let mut inner_outer: Vec<&Graph> = outer.to_vec();
    inner_outer.push(g);
    for n in order {
        let node = g.node(n);
        let mut names = HashSet::new();
        for a in &node.attrs {
            if !names.insert(a.name.as_str()) {
                return fail(format!(
                    "{}: attribute '{}' appears twice",
                    g.describe_node(n),
                    a.name
                ));
            }
        }
        if check_domains {
            let domain = canonical_domain(&node.domain);
            let imported = scope
                .imports
                .iter()
                .any(|o| canonical_domain(&o.domain) == domain);
            let local_function = scope
                .functions
                .iter()
                .any(|(d, name)| d == &node.domain && name == &node.op_type);
            if !imported && !local_function {
                return fail(format!(
                    "{} uses domain '{}', which is not imported (opset_import)",
                    g.describe_node(n),
                    node.domain
                ));
            }
        }
        if node.op_type == "Constant" && node.domain.is_empty() {
            if let (Some(AttrValue::Tensor(t)), Some(Some(out))) =
                (node.attr("value"), node.outputs().first())
            {
                if let Some(ValueType::Tensor(decl)) = &g.value(*out).ty {
                    if !decl.admits(t.dtype(), t.shape()) {
                        return fail(format!(
                            "{}: output '{}' is declared {decl} but the constant is {}{}",
                            g.describe_node(n),
                            g.value(*out).name(),
                            t.dtype(),
                            crate::ShapeFmt(t.shape())
                        ));
                    }
                }
            }
        }
        for a in &node.attrs {
            for sub in a.value.subgraphs() {
                verify_graph_inner(sub, scope, &inner_outer, check_domains).map_err(|e| {
                    VerifyError {
                        message: format!(
                            "in subgraph '{}' (attribute '{}' of {}): {}",
                            sub.name,
                            a.name,
                            g.describe_node(n),
                            e.message
                        ),
                    }
                })?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attribute, NewNode, Tensor, TensorType};

    fn model(g: Graph) -> Model {
        Model::new(g, 13)
    }

    #[test]
    fn an_undefined_input_names_its_node() {
        let mut g = Graph::new("g");
        let ghost = g.add_value("ghost", None).unwrap();
        let y = g.add_value("y", None).unwrap();
        g.add_node(NewNode::new("Relu").named("r").inputs([ghost]).outputs([y]))
            .unwrap();
        g.set_outputs(vec![y]).unwrap();
        let e = verify_model(&model(g)).unwrap_err();
        assert_eq!(
            e.message,
            "node 'r' (Relu): input 0 'ghost' is not defined by any node, initializer or graph input"
        );
    }

    #[test]
    fn a_cycle_is_reported() {
        let mut g = Graph::new("g");
        let a = g.add_value("a", None).unwrap();
        let b = g.add_value("b", None).unwrap();
        g.add_node(NewNode::new("Neg").named("n1").inputs([b]).outputs([a]))
            .unwrap();
        g.add_node(NewNode::new("Neg").named("n2").inputs([a]).outputs([b]))
            .unwrap();
        g.set_outputs(vec![a]).unwrap();
        let e = verify_model(&model(g)).unwrap_err();
        assert_eq!(
            e.message,
            "the graph has a cycle through node 'n1' (Neg), node 'n2' (Neg)"
        );
    }

    #[test]
    fn declared_types_must_admit_the_initializer() {
        let mut g = Graph::new("g");
        let w = g
            .add_initializer("w", Tensor::f32(&[2], vec![1.0, 2.0]).unwrap())
            .unwrap();
        g.declare_type(
            w,
            Some(ValueType::Tensor(TensorType::of_concrete(
                crate::DataType::I64,
                &[2],
            ))),
        )
        .unwrap();
        g.set_outputs(vec![w]).unwrap();
        let e = verify_model(&model(g)).unwrap_err();
        assert_eq!(
            e.message,
            "value 'w' is declared i64[2] but its initializer is f32[2]"
        );
    }

    #[test]
    fn domains_must_be_imported_and_attributes_unique() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", None).unwrap();
        let y = g.add_value("y", None).unwrap();
        let n = g
            .add_node(
                NewNode::new("Foo")
                    .domain("com.acme")
                    .named("f")
                    .inputs([x])
                    .outputs([y]),
            )
            .unwrap();
        g.set_outputs(vec![y]).unwrap();
        let mut m = model(g);
        let e = verify_model(&m).unwrap_err();
        assert_eq!(
            e.message,
            "node 'f' (com.acme.Foo) uses domain 'com.acme', which is not imported (opset_import)"
        );
        m.opset_imports.push(OpsetImport {
            domain: "com.acme".into(),
            version: 1,
        });
        verify_model(&m).unwrap();
        let attr = Attribute {
            name: "k".into(),
            value: AttrValue::Int(1),
            doc: String::new(),
        };
        m.graph.node_mut(n).unwrap().attrs = vec![attr.clone(), attr];
        let e = verify_model(&m).unwrap_err();
        assert_eq!(
            e.message,
            "node 'f' (com.acme.Foo): attribute 'k' appears twice"
        );
    }

    #[test]
    fn subgraphs_may_capture_outer_values_only() {
        let mut outer = Graph::new("main");
        let x = outer.add_input("x", None).unwrap();
        let cond = outer.add_input("cond", None).unwrap();
        let y = outer.add_value("y", None).unwrap();
        let mut branch = Graph::new("then");
        let cx = branch.add_captured("x").unwrap();
        let out = branch.add_value("t", None).unwrap();
        branch
            .add_node(NewNode::new("Neg").inputs([cx]).outputs([out]))
            .unwrap();
        branch.set_outputs(vec![out]).unwrap();
        let mut bad = branch.clone();
        bad.rename_value(cx, "nowhere").unwrap();
        outer
            .add_node(
                NewNode::new("If")
                    .named("if")
                    .inputs([cond])
                    .outputs([y])
                    .attr("then_branch", AttrValue::Graph(Box::new(branch)))
                    .attr("else_branch", AttrValue::Graph(Box::new(bad))),
            )
            .unwrap();
        outer.set_outputs(vec![y]).unwrap();
        let _ = x;
        let e = verify_model(&model(outer)).unwrap_err();
        assert_eq!(
            e.message,
            "in subgraph 'then' (attribute 'else_branch' of node 'if' (If)): value 'nowhere' is not defined here nor in any enclosing graph"
        );
    }
}
