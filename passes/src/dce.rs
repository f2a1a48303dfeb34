//! `dce`: dead-code elimination. Removes nodes whose outputs nothing reads
//! (no consumer, not a graph output), then the values and initializers left
//! unused. Nodes without outputs are kept: nothing says they are dead. Only
//! the main graph is cleaned; subgraphs are left as they are.

use crate::{Pass, PassContext};
use qgraph_ir::{Graph, Model};

pub struct DeadCodeElimination;

fn is_dead(g: &Graph, n: qgraph_ir::NodeId) -> bool {
    let outs = g.node(n).outputs();
    outs.iter().any(Option::is_some) && outs.iter().flatten().all(|&v| !g.is_used(v))
}

impl Pass for DeadCodeElimination {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<bool, String> {
        let g = &mut model.graph;
        let mut changed = false;
        // Consumers before producers: one sweep in reverse topological order
        // removes whole dead chains.
        let order = crate::util::order(g)?;
        for &n in order.iter().rev() {
            if !is_dead(g, n) || !cx.allow_rewrite() {
                continue;
            }
            let node = g.remove_node(n).map_err(|e| e.to_string())?;
            for v in node.outputs().iter().flatten() {
                g.remove_value(*v).map_err(|e| e.to_string())?;
            }
            for v in node.inputs().iter().flatten() {
                if !g.contains_value(*v) {
                    continue;
                }
                let val = g.value(*v);
                if !g.is_used(*v) && !val.is_graph_input() && val.initializer().is_some() {
                    g.remove_value(*v).map_err(|e| e.to_string())?;
                }
            }
            changed = true;
        }
        // Initializers and values nothing reads or defines any more (left by
        // other passes too).
        for v in g.value_ids() {
            let val = g.value(v);
            if g.is_used(v)
                || val.is_graph_input()
                || val.is_graph_output()
                || val.is_captured()
                || g.producer(v).is_some()
                || !cx.allow_rewrite()
            {
                continue;
            }
            g.remove_value(v).map_err(|e| e.to_string())?;
            changed = true;
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Driver;

    #[test]
    fn dead_chains_and_their_weights_go_live_code_stays() {
        let src = r#"
ir_version 8
opset "" 13
graph g {
  input %x: f32[2]
  output %y: f32[2]
  init %w = f32[2] [1.0, 2.0]
  init %unused_by_live = f32[2] [3.0, 4.0]
  live: %y = Mul(%x, %w)
  dead1: %d1 = Add(%x, %unused_by_live)
  dead2: %d2 = Relu(%d1)
  half: %h1, %h2 = Split(%x)
  keep_h: %k = Neg(%h1)
}
"#;
        let mut m = qgraph_text::parse_model(src).unwrap();
        let report = Driver::new().add(DeadCodeElimination).run(&mut m).unwrap();
        assert_eq!(report.runs, vec![("dce", true)]);
        let text = qgraph_text::print_model(&m, &Default::default());
        assert_eq!(
            text,
            r#"ir_version 8
opset "" 13

graph g {
  input %x: f32[2]
  output %y: f32[2]
  init %w = f32[2] [1.0, 2.0]
  live: %y = Mul(%x, %w)
}
"#
        );
        // A second run finds nothing.
        let report = Driver::new().add(DeadCodeElimination).run(&mut m).unwrap();
        assert_eq!(report.runs, vec![("dce", false)]);
    }

    #[test]
    fn the_rewrite_limit_stops_after_n_removals() {
        let src = r#"
ir_version 8
opset "" 13
graph g {
  input %x: f32[2]
  output %x
  a: %a = Relu(%x)
  b: %b = Relu(%a)
}
"#;
        let mut m = qgraph_text::parse_model(src).unwrap();
        let report = Driver::new()
            .add(DeadCodeElimination)
            .rewrite_limit(Some(1))
            .run(&mut m)
            .unwrap();
        assert_eq!(report.rewrites, 1);
        assert_eq!(m.graph.node_count(), 1);
        assert!(m.graph.node_by_name("a").is_some());
    }
}
