//! The string operators: StringConcat, StringSplit, RegexFullMatch.

use super::typed::zip2;
use super::{input, Kernel};
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{ArrayD, IxDyn};
use qgraph_ir::Tensor;

pub const KERNELS: &[(&str, Kernel)] = &[
    ("StringConcat", string_concat),
    ("StringSplit", string_split),
    ("RegexFullMatch", regex_full_match),
];

type Out = Result<Vec<Tensor>, EvalError>;

fn strings<'t>(
    cx: &OpCtx,
    inputs: &[Option<&'t Tensor>],
    i: usize,
) -> Result<&'t ArrayD<Vec<u8>>, EvalError> {
    match input(cx, inputs, i)? {
        Tensor::String(a) => Ok(a),
        t => cx.err(format!(
            "input {i} is {}, this operator takes strings",
            t.dtype()
        )),
    }
}

/// The elements of two string tensors joined, with broadcasting.
pub fn string_concat(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let (x, y) = (strings(cx, inputs, 0)?, strings(cx, inputs, 1)?);
    let joined = zip2(cx, x, y, |a, b| {
        let mut s = a.clone();
        s.extend_from_slice(b);
        s
    })?;
    Ok(vec![Tensor::String(joined)])
}

/// Python's `str.split(None, maxsplit)`: runs of whitespace separate,
/// none at either end; after `maxsplit` splits the rest is one piece.
fn split_whitespace(s: &str, maxsplit: Option<usize>) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        if maxsplit == Some(out.len()) {
            out.push(rest.to_string());
            break;
        }
        match rest.find(char::is_whitespace) {
            Some(i) => {
                out.push(rest[..i].to_string());
                rest = rest[i..].trim_start();
            }
            None => {
                out.push(rest.to_string());
                break;
            }
        }
    }
    out
}

/// StringSplit: each element split by `delimiter` (runs of whitespace when
/// it is absent or empty), at most `maxsplit` times; the pieces padded with
/// empty strings to the longest count, and the counts.
pub fn string_split(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let x = strings(cx, inputs, 0)?;
    let delimiter = cx.string_attr("delimiter", "")?;
    let maxsplit = match cx.int_attr("maxsplit", -1)? {
        m if m < 0 => None,
        m => Some(m as usize),
    };
    let pieces: Vec<Vec<String>> = x
        .iter()
        .map(|bytes| {
            let s = String::from_utf8_lossy(bytes);
            if delimiter.is_empty() {
                split_whitespace(&s, maxsplit)
            } else {
                match maxsplit {
                    Some(m) => s
                        .splitn(m + 1, delimiter.as_str())
                        .map(String::from)
                        .collect(),
                    None => s.split(delimiter.as_str()).map(String::from).collect(),
                }
            }
        })
        .collect();
    let longest = pieces.iter().map(Vec::len).max().unwrap_or(0);
    let mut shape = x.shape().to_vec();
    let counts: Vec<i64> = pieces.iter().map(|p| p.len() as i64).collect();
    let counts = ArrayD::from_shape_vec(IxDyn(&shape), counts).map_err(|e| EvalError::Op {
        node: cx.describe(),
        message: e.to_string(),
    })?;
    shape.push(longest);
    let mut flat = Vec::with_capacity(pieces.len() * longest);
    for p in pieces {
        let n = p.len();
        flat.extend(p.into_iter().map(String::into_bytes));
        flat.extend(std::iter::repeat_n(Vec::new(), longest - n));
    }
    let substrings = ArrayD::from_shape_vec(IxDyn(&shape), flat).map_err(|e| EvalError::Op {
        node: cx.describe(),
        message: e.to_string(),
    })?;
    Ok(vec![Tensor::String(substrings), Tensor::I64(counts)])
}

/// RegexFullMatch: whether each element matches `pattern` (RE2 syntax,
/// which the regex crate follows) as a whole.
pub fn regex_full_match(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let x = strings(cx, inputs, 0)?;
    let pattern = cx.string_attr("pattern", "")?;
    let regex = match regex::Regex::new(&format!("^(?:{pattern})$")) {
        Ok(r) => r,
        Err(e) => return cx.err(format!("pattern '{pattern}' is not a valid regex: {e}")),
    };
    Ok(vec![Tensor::Bool(
        x.mapv(|s| regex.is_match(&String::from_utf8_lossy(&s))),
    )])
}

#[cfg(test)]
mod tests {
    use super::split_whitespace;

    #[test]
    fn whitespace_split_follows_python() {
        assert_eq!(split_whitespace("  a b  c ", None), ["a", "b", "c"]);
        assert_eq!(split_whitespace("  a b  c ", Some(1)), ["a", "b  c "]);
        assert!(split_whitespace("   ", None).is_empty());
        assert!(split_whitespace("", Some(0)).is_empty());
    }
}
