//! `infer-shapes`: declares the element type and shape of every value a
//! node computes, from the graph inputs' declarations and the initializers,
//! with symbolic dims kept (the batch `N` stays `N`); see
//! `qgraph_eval::shapes`. A declared dim is never replaced by a less known
//! one. The graph computes the same; later passes (and a reader of the
//! text form) see the shapes.

use crate::{Pass, PassContext};
use qgraph_ir::{Model, TensorType, ValueType};

pub struct InferShapes;

impl Pass for InferShapes {
    fn name(&self) -> &'static str {
        "infer-shapes"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<bool, String> {
        let info = qgraph_eval::shapes::infer(model);
        let g = &mut model.graph;
        let mut changed = false;
        for v in g.value_ids() {
            if g.producer(v).is_none() {
                continue;
            }
            let Some(i) = info.get(&v) else { continue };
            if i.dtype.is_none() && i.dims.is_none() {
                continue;
            }
            let ty = ValueType::Tensor(TensorType {
                dtype: i.dtype,
                shape: i.dims.clone(),
            });
            if g.value(v).ty.as_ref() == Some(&ty) || !cx.allow_rewrite() {
                continue;
            }
            g.declare_type(v, Some(ty)).map_err(|e| e.to_string())?;
            changed = true;
        }
        Ok(changed)
    }
}
