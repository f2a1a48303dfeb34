//! Reading node attributes, with errors that name the node.

use crate::{EvalError, OpCtx};
use qgraph_ir::{AttrValue, Tensor};

impl OpCtx<'_> {
    fn attr(&self, name: &str) -> Option<&AttrValue> {
        self.graph.node(self.node).attr(name)
    }

    fn wrong_kind<T>(&self, name: &str, want: &str) -> Result<T, EvalError> {
        self.err(format!("attribute '{name}' must be {want}"))
    }

    pub fn int_attr(&self, name: &str, default: i64) -> Result<i64, EvalError> {
        match self.attr(name) {
            None => Ok(default),
            Some(AttrValue::Int(i)) => Ok(*i),
            Some(_) => self.wrong_kind(name, "an int"),
        }
    }

    pub fn float_attr(&self, name: &str, default: f32) -> Result<f32, EvalError> {
        match self.attr(name) {
            None => Ok(default),
            Some(AttrValue::Float(f)) => Ok(*f),
            Some(_) => self.wrong_kind(name, "a float"),
        }
    }

    pub fn ints_attr(&self, name: &str) -> Result<Option<Vec<i64>>, EvalError> {
        match self.attr(name) {
            None => Ok(None),
            Some(AttrValue::Ints(v)) => Ok(Some(v.clone())),
            Some(_) => self.wrong_kind(name, "a list of ints"),
        }
    }

    pub fn floats_attr(&self, name: &str) -> Result<Option<Vec<f32>>, EvalError> {
        match self.attr(name) {
            None => Ok(None),
            Some(AttrValue::Floats(v)) => Ok(Some(v.clone())),
            Some(_) => self.wrong_kind(name, "a list of floats"),
        }
    }

    pub fn string_attr(&self, name: &str, default: &str) -> Result<String, EvalError> {
        match self.attr(name) {
            None => Ok(default.to_string()),
            Some(AttrValue::String(s)) => Ok(String::from_utf8_lossy(s).into_owned()),
            Some(_) => self.wrong_kind(name, "a string"),
        }
    }

    pub fn tensor_attr(&self, name: &str) -> Result<Option<&Tensor>, EvalError> {
        match self.attr(name) {
            None => Ok(None),
            Some(AttrValue::Tensor(t)) => Ok(Some(t)),
            Some(_) => self.wrong_kind(name, "a tensor"),
        }
    }

    /// Resolves a possibly negative axis against a rank.
    pub fn axis(&self, axis: i64, rank: usize) -> Result<usize, EvalError> {
        let r = rank as i64;
        if axis < -r || axis >= r.max(1) {
            return self.err(format!("axis {axis} is out of range for rank {rank}"));
        }
        Ok(if axis < 0 {
            (axis + r) as usize
        } else {
            axis as usize
        })
    }
}
