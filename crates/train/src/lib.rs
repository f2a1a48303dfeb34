//! qgraph's trainer: quantization-aware training of Q/DQ graphs, and plain
//! training of float graphs, on the evaluator's forward and backward
//! kernels.
//!
//! A model becomes a [`TrainingGraph`] (Q/DQ pairs become FakeQuantize
//! nodes on their grids, with straight-through gradients; LSQ and PACT
//! scales learn, others follow the values), a [`Trainer`] runs steps of
//! forward, loss, backward and an optimizer update, and `export` writes
//! the trained numbers back into the original graph.

pub mod graph;
pub mod loss;
pub mod optim;
mod trainer;

pub use graph::{ExportForm, PrepareOptions, ScaleRule, TrainingGraph};
pub use optim::{Optimizer, Schedule};
pub use trainer::{Config, StepReport, Targets, Trainer};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Graph(String),
    #[error("{0}")]
    Eval(String),
    #[error("{0}")]
    Data(String),
}

impl From<qgraph_eval::EvalError> for TrainError {
    fn from(e: qgraph_eval::EvalError) -> TrainError {
        TrainError::Eval(e.to_string())
    }
}
