//! Graph passes and the driver that runs them.
//!
//! A pass reads the model, matches, then rewrites through the IR's mutation
//! API, and says whether it changed anything. The [`Driver`] runs passes in
//! order, verifies the model after each one, and puts the pass's name in any
//! error, so a broken rewrite is caught where it happened. Passes never
//! import each other: each module stands alone.

mod commute_dequantize;
mod dce;
mod fold_bn;
mod fold_constants;
mod fold_pad;
mod fold_weight_quant;
mod fuse_conv_bn_act;
mod fuse_matmul_add;
mod infer_shapes;
mod insert_qdq;
mod lower_to_integer;
pub mod opset_upgrade;
mod pipeline;
mod reduce_mean_to_pool;
mod remove_noops;
mod remove_requantize;
mod util;

pub use commute_dequantize::{CommuteDequantize, COMMUTES};
pub use dce::DeadCodeElimination;
pub use fold_bn::FoldBatchNorm;
pub use fold_constants::FoldConstants;
pub use fold_pad::FoldPad;
pub use fold_weight_quant::FoldWeightQuant;
pub use fuse_conv_bn_act::{
    FuseConvBnAct, GROUP_KEY as FUSION_GROUP_KEY, ROLE_KEY as FUSION_ROLE_KEY,
};
pub use fuse_matmul_add::FuseMatMulAdd;
pub use infer_shapes::InferShapes;
pub use insert_qdq::{
    insert_qdq, plan_qdq, recorded_range, Calibrated, InsertOptions, InsertQdq, InsertReport,
    Override, Placement, QdqPlan, Site, GRID_KEY, QUANTIZES_KEY, RANGE_KEY,
};
pub use lower_to_integer::{float_ops, LowerToInteger};
pub use pipeline::{known_names, parse_pipeline, registry, Params, PassInfo, ALIASES};
pub use reduce_mean_to_pool::ReduceMeanToPool;
pub use remove_noops::RemoveNoops;
pub use remove_requantize::RemoveRequantize;

/// Every pass the pipeline parser knows, in alphabetical order.
static REGISTRY: [PassInfo; 14] = [
    PassInfo {
        name: "commute-dequantize",
        summary: "move a per-tensor DequantizeLinear below the Reshape, Flatten, Squeeze, Unsqueeze, Transpose, MaxPool or Concat (equal scales) that reads it, so the op runs on integers",
        build: |p| p.finish(&[]).map(|_| Box::new(CommuteDequantize) as Box<dyn Pass>),
    },
    PassInfo {
        name: "dce",
        summary: "remove nodes whose outputs nothing reads, then unused values and initializers",
        build: |p| p.finish(&[]).map(|_| Box::new(DeadCodeElimination) as Box<dyn Pass>),
    },
    PassInfo {
        name: "fold-bn",
        summary: "fold inference BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it",
        build: |p| p.finish(&[]).map(|_| Box::new(FoldBatchNorm) as Box<dyn Pass>),
    },
    PassInfo {
        name: "fold-constants",
        summary: "evaluate nodes whose inputs are all constant and store their outputs as initializers (max-elements=N bounds the size of a new initializer that is larger than the node's inputs; default 65536)",
        build: FoldConstants::from_params,
    },
    PassInfo {
        name: "fold-pad",
        summary: "move a zero Pad of the spatial dims into the pads of the Conv or AveragePool that alone reads it",
        build: |p| p.finish(&[]).map(|_| Box::new(FoldPad) as Box<dyn Pass>),
    },
    PassInfo {
        name: "fold-weight-quant",
        summary: "store quantized weights as integers: a QuantizeLinear of constants becomes its integer output (int4=true packs 4-bit grids as int4/uint4, at opset 21)",
        build: FoldWeightQuant::from_params,
    },
    PassInfo {
        name: "fuse-conv-bn-act",
        summary: "mark Conv/ConvTranspose/Gemm/MatMul [+ BatchNormalization] + activation as one fusion group (node metadata qgraph.fusion.group / qgraph.fusion.role) that quantization keeps whole",
        build: |p| p.finish(&[]).map(|_| Box::new(FuseConvBnAct) as Box<dyn Pass>),
    },
    PassInfo {
        name: "fuse-matmul-add",
        summary: "turn MatMul of 2-D operands followed by Add of a per-column constant into Gemm",
        build: |p| p.finish(&[]).map(|_| Box::new(FuseMatMulAdd) as Box<dyn Pass>),
    },
    PassInfo {
        name: "infer-shapes",
        summary: "declare the type and shape of every computed value (symbolic dims such as the batch kept)",
        build: |p| p.finish(&[]).map(|_| Box::new(InferShapes) as Box<dyn Pass>),
    },
    PassInfo {
        name: "insert-qdq",
        summary: "insert QuantizeLinear/DequantizeLinear pairs by TensorRT's placement rules (scheme=int8|int8-asym|wNaM, placement=tensorrt|ort, ends-at-8-bits=true|false, pow2-scales=true|false: every scale a power of two); weights from their values, activations where a calibrated range is recorded (qgraph insert calibrates)",
        build: InsertQdq::from_params,
    },
    PassInfo {
        name: "lower-to-integer",
        summary: "turn DequantizeLinear -> Conv/Gemm/MatMul/Add/Mul/GlobalAveragePool/Concat/Sigmoid -> QuantizeLinear groups into QLinearConv, QLinearMatMul and the com.microsoft QLinear ops and QGemm; ops=onnx: operators of the ONNX standard only (Gemm as QLinearConv 1x1 or MatMulInteger), the rest kept between Q/DQ",
        build: |mut p| {
            let standard_only = match p.take("ops").as_deref() {
                None | Some("ort") => false,
                Some("onnx") => true,
                Some(other) => return Err(format!("ops must be ort or onnx, not '{other}'")),
            };
            p.finish(&["ops"])?;
            Ok(Box::new(LowerToInteger { standard_only }) as Box<dyn Pass>)
        },
    },
    PassInfo {
        name: "reduce-mean-to-pool",
        summary: "turn a ReduceMean over the spatial axes of a 4-D tensor, dims kept, into GlobalAveragePool (the form quantizers and integer targets know)",
        build: |p| p.finish(&[]).map(|_| Box::new(ReduceMeanToPool) as Box<dyn Pass>),
    },
    PassInfo {
        name: "remove-noops",
        summary: "remove Identity, inference Dropout, Cast to the same type, Reshape to the same shape, Pad by zeros, Transpose by the identity permutation",
        build: |p| p.finish(&[]).map(|_| Box::new(RemoveNoops) as Box<dyn Pass>),
    },
    PassInfo {
        name: "remove-requantize",
        summary: "read the integers directly where a QuantizeLinear undoes a DequantizeLinear with the same scale, zero point and axis",
        build: |p| p.finish(&[]).map(|_| Box::new(RemoveRequantize) as Box<dyn Pass>),
    },
];

use qgraph_ir::{verify_model, Model};

/// A graph transformation.
pub trait Pass {
    /// The name used in pipelines and messages (`dce`, `fold-bn`, ...).
    fn name(&self) -> &'static str;

    /// Runs the pass; returns whether the model changed.
    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<bool, String>;
}

/// State a pass shares with the driver: the rewrite budget used to bisect a
/// bad rewrite (stop after N rewrites, see which one broke the model).
#[derive(Debug, Default)]
pub struct PassContext {
    budget: Option<usize>,
    /// Rewrites made so far in this run.
    pub rewrites: usize,
}

impl PassContext {
    pub fn with_rewrite_limit(limit: Option<usize>) -> PassContext {
        PassContext {
            budget: limit,
            rewrites: 0,
        }
    }

    /// Asks for one rewrite. `false` when the limit is reached: the pass
    /// must then leave the rest of the model as it is.
    pub fn allow_rewrite(&mut self) -> bool {
        if self.budget.is_some_and(|b| self.rewrites >= b) {
            return false;
        }
        self.rewrites += 1;
        true
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassError {
    #[error("pass '{pass}' failed: {message}")]
    Failed { pass: &'static str, message: String },
    #[error("pass '{pass}' left an invalid model: {message}")]
    Invalid { pass: &'static str, message: String },
}

/// What a driver run did: for each pass run, its name and whether it changed
/// the model.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub runs: Vec<(&'static str, bool)>,
    pub rewrites: usize,
    /// Rounds of the whole pipeline run (see `Driver::fixpoint`).
    pub rounds: usize,
    /// Whether the last round changed nothing.
    pub converged: bool,
}

/// Runs passes in order, verifying after each.
#[derive(Default)]
pub struct Driver {
    passes: Vec<Box<dyn Pass>>,
    rewrite_limit: Option<usize>,
    rounds: usize,
}

impl Driver {
    pub fn new() -> Driver {
        Driver::default()
    }

    #[allow(clippy::should_implement_trait)] // a builder step, not arithmetic
    pub fn add(mut self, pass: impl Pass + 'static) -> Driver {
        self.passes.push(Box::new(pass));
        self
    }

    /// A driver for a pipeline string such as `fold-constants,fold-bn,cleanup`.
    pub fn from_pipeline(text: &str) -> Result<Driver, String> {
        Ok(Driver {
            passes: parse_pipeline(text)?,
            ..Driver::default()
        })
    }

    /// Repeats the whole pipeline while a round changes the model, at most
    /// `rounds` times (1, the default, runs it once).
    pub fn fixpoint(mut self, rounds: usize) -> Driver {
        self.rounds = rounds;
        self
    }

    /// The names of the passes, in order.
    pub fn pass_names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Stop rewriting after `n` rewrites in total (for bisecting).
    pub fn rewrite_limit(mut self, n: Option<usize>) -> Driver {
        self.rewrite_limit = n;
        self
    }

    /// Runs every pass once, calling `after(pass name, model)` after each
    /// (for dumps), verifying the model after each.
    pub fn run_with(
        &self,
        model: &mut Model,
        mut after: impl FnMut(&str, &Model),
    ) -> Result<Report, PassError> {
        let mut cx = PassContext::with_rewrite_limit(self.rewrite_limit);
        let mut report = Report::default();
        for _ in 0..self.rounds.max(1) {
            let mut any = false;
            for pass in &self.passes {
                let changed = pass
                    .run(model, &mut cx)
                    .map_err(|message| PassError::Failed {
                        pass: pass.name(),
                        message,
                    })?;
                verify_model(model).map_err(|e| PassError::Invalid {
                    pass: pass.name(),
                    message: e.message,
                })?;
                after(pass.name(), model);
                report.runs.push((pass.name(), changed));
                any |= changed;
            }
            report.rounds += 1;
            if !any {
                report.converged = true;
                break;
            }
        }
        report.rewrites = cx.rewrites;
        Ok(report)
    }

    pub fn run(&self, model: &mut Model) -> Result<Report, PassError> {
        self.run_with(model, |_, _| {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgraph_ir::{Graph, NewNode};

    /// A deliberately broken pass: removes the first node without rewiring.
    struct Vandal;

    impl Pass for Vandal {
        fn name(&self) -> &'static str {
            "vandal"
        }
        fn run(&self, model: &mut Model, _: &mut PassContext) -> Result<bool, String> {
            let first = model.graph.node_ids()[0];
            model.graph.remove_node(first).map_err(|e| e.to_string())?;
            Ok(true)
        }
    }

    #[test]
    fn the_driver_names_the_pass_that_broke_the_model() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", None).unwrap();
        let y = g.add_value("y", None).unwrap();
        g.add_node(NewNode::new("Relu").named("relu").inputs([x]).outputs([y]))
            .unwrap();
        g.set_outputs(vec![y]).unwrap();
        let mut m = Model::new(g, 13);
        let e = Driver::new().add(Vandal).run(&mut m).unwrap_err();
        assert_eq!(
            e.to_string(),
            "pass 'vandal' left an invalid model: graph output 'y' is not defined by any node, initializer or graph input"
        );
    }

    #[test]
    fn the_rewrite_budget_runs_out() {
        let mut cx = PassContext::with_rewrite_limit(Some(2));
        assert!(cx.allow_rewrite());
        assert!(cx.allow_rewrite());
        assert!(!cx.allow_rewrite());
        assert_eq!(cx.rewrites, 2);
    }
}
