//! The string and text operators: StringConcat, StringSplit,
//! RegexFullMatch, StringNormalizer, TfIdfVectorizer.

use super::typed::zip2;
use super::{input, Kernel};
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{ArrayD, IxDyn};
use qgraph_ir::{AttrValue, Tensor};
use std::collections::HashMap;
use std::hash::Hash;

pub const KERNELS: &[(&str, Kernel)] = &[
    ("StringConcat", string_concat),
    ("StringSplit", string_split),
    ("RegexFullMatch", regex_full_match),
    ("StringNormalizer", string_normalizer),
    ("TfIdfVectorizer", tfidf_vectorizer),
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

/// A list-of-strings attribute; none when absent.
fn strings_attr(cx: &OpCtx, name: &str) -> Result<Vec<Vec<u8>>, EvalError> {
    match cx.graph.node(cx.node).attr(name) {
        None => Ok(Vec::new()),
        Some(AttrValue::Strings(v)) => Ok(v.clone()),
        Some(_) => cx.err(format!("attribute '{name}' must be a list of strings")),
    }
}

fn utf8<'s>(cx: &OpCtx, bytes: &'s [u8], what: &str) -> Result<&'s str, EvalError> {
    std::str::from_utf8(bytes).or_else(|_| cx.err(format!("{what} is not valid UTF-8")))
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum CaseChange {
    Keep,
    Lower,
    Upper,
}

impl CaseChange {
    /// Case mapping is Unicode's default, locale-independent one: Rust's
    /// `str::to_lowercase` / `to_uppercase`, full mappings (ß → SS, final
    /// sigma), the same as Python's `str.lower` / `upper` that onnx's
    /// reference uses. (ONNX Runtime maps one code point at a time with the
    /// C library's towlower/towupper, so it keeps ß in upper case.)
    fn apply(self, s: &str) -> String {
        match self {
            CaseChange::Keep => s.to_string(),
            CaseChange::Lower => s.to_lowercase(),
            CaseChange::Upper => s.to_uppercase(),
        }
    }
}

/// The default case mapping is right for every locale but those with
/// casing rules of their own (Turkish and Azeri dotted and dotless i,
/// Lithuanian dot above): those are refused rather than mapped wrongly.
fn check_locale(cx: &OpCtx, locale: &str) -> Result<(), EvalError> {
    let language = locale
        .split(['_', '-', '.', '@'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if matches!(language.as_str(), "tr" | "az" | "lt") {
        return cx.err(format!(
            "StringNormalizer: locale '{locale}' has its own case mapping rules, which are not \
             supported (only Unicode's default mapping, as for en_US)"
        ));
    }
    Ok(())
}

/// StringNormalizer: drops the elements equal to a stopword (compared in
/// lower case unless `is_case_sensitive`, as ONNX Runtime does; the whole
/// element is compared, as the spec says), then changes the case of the
/// rest. Takes [C] or [1, C]; when nothing is left the output is one empty
/// string, of shape [1] or [1, 1].
pub fn string_normalizer(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let x = strings(cx, inputs, 0)?;
    let action = match cx.string_attr("case_change_action", "NONE")?.as_str() {
        "NONE" => CaseChange::Keep,
        "LOWER" => CaseChange::Lower,
        "UPPER" => CaseChange::Upper,
        other => {
            return cx.err(format!(
                "case_change_action '{other}' is not one of LOWER, UPPER, NONE"
            ))
        }
    };
    let case_sensitive = cx.int_attr("is_case_sensitive", 0)? != 0;
    check_locale(cx, &cx.string_attr("locale", "en_US")?)?;
    let fold = |s: &str| {
        if case_sensitive {
            s.to_string()
        } else {
            s.to_lowercase()
        }
    };
    let mut stopwords = std::collections::HashSet::new();
    for w in strings_attr(cx, "stopwords")? {
        stopwords.insert(fold(utf8(cx, &w, "a stopword")?));
    }
    let two_d = match x.shape() {
        [_] => false,
        [1, _] => true,
        s => {
            return cx.err(format!(
                "StringNormalizer takes a [C] or [1, C] input, not shape {s:?}"
            ))
        }
    };
    let mut kept = Vec::new();
    for (k, bytes) in x.iter().enumerate() {
        let s = utf8(cx, bytes, &format!("input element {k}"))?;
        if !stopwords.is_empty() && stopwords.contains(&fold(s)) {
            continue;
        }
        kept.push(action.apply(s).into_bytes());
    }
    if kept.is_empty() {
        kept.push(Vec::new());
    }
    let shape = if two_d {
        vec![1, kept.len()]
    } else {
        vec![kept.len()]
    };
    let y = ArrayD::from_shape_vec(IxDyn(&shape), kept).map_err(|e| EvalError::Op {
        node: cx.describe(),
        message: e.to_string(),
    })?;
    Ok(vec![Tensor::String(y)])
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Weighting {
    Tf,
    Idf,
    TfIdf,
}

/// One node of the n-gram trie: `id` numbers the n-gram that ends here
/// (1-based over the whole pool; 0 for none), `next` the items that
/// extend it.
struct GramNode<K> {
    id: usize,
    next: HashMap<K, GramNode<K>>,
}

impl<K: Eq + Hash + Copy> GramNode<K> {
    fn new() -> Self {
        GramNode {
            id: 0,
            next: HashMap::new(),
        }
    }
}

/// The pool's n-grams in a trie, numbered as onnx's reference and ONNX
/// Runtime number them: level `n` (n-grams of n items) runs from
/// `ngram_counts[n-1]` to the next level's start (the pool's end for the
/// last), every n-gram of every level takes the next number in pool order,
/// but only the levels from `min_len` to `max_len` are stored.
fn gram_trie<K: Eq + Hash + Copy>(
    pool: &[K],
    ngram_counts: &[usize],
    min_len: usize,
    max_len: usize,
) -> GramNode<K> {
    let mut root = GramNode::new();
    let mut next_id = 1;
    for (level, &start) in ngram_counts.iter().enumerate() {
        let len = level + 1;
        let end = ngram_counts.get(level + 1).copied().unwrap_or(pool.len());
        if end <= start {
            continue;
        }
        let grams = (end - start) / len;
        if len < min_len || len > max_len {
            next_id += grams;
            continue;
        }
        for gram in pool[start..start + grams * len].chunks_exact(len) {
            let mut node = &mut root;
            for item in gram {
                node = node.next.entry(*item).or_insert_with(GramNode::new);
            }
            node.id = next_id;
            next_id += 1;
        }
    }
    root
}

/// What TfIdfVectorizer counts with, from its attributes.
struct GramSpec {
    ngram_counts: Vec<usize>,
    min_len: usize,
    max_len: usize,
    max_skip: usize,
    ngram_indexes: Vec<usize>,
    /// Output columns: max(ngram_indexes) + 1.
    width: usize,
}

/// Adds the counts of the trie's n-grams found in `row` to `counts` (one
/// row of the output), as onnx's reference and ONNX Runtime do: for each
/// skip distance 1..=max_skip+1 (items taken every `skip`), the n-grams
/// starting at each position; unigrams counted on the first pass only.
/// Errs with an n-gram number that has no ngram_indexes entry.
fn count_row<K: Eq + Hash + Copy>(
    trie: &GramNode<K>,
    spec: &GramSpec,
    row: &[K],
    counts: &mut [u64],
) -> Result<(), usize> {
    let mut shortest = spec.min_len;
    for skip in 1..=spec.max_skip.saturating_add(1) {
        // Past this no n-gram of the shortest length fits in the row, at
        // this skip or any larger one.
        if shortest > 1 && skip.saturating_mul(shortest - 1) >= row.len() {
            break;
        }
        for begin in 0..row.len() {
            if begin + skip * (shortest - 1) >= row.len() {
                break;
            }
            let mut node = trie;
            let mut len = 1;
            let mut at = begin;
            while !node.next.is_empty() && len <= spec.max_len && at < row.len() {
                let Some(child) = node.next.get(&row[at]) else {
                    break;
                };
                if len >= shortest && child.id != 0 {
                    match spec.ngram_indexes.get(child.id - 1) {
                        Some(&column) => counts[column] += 1,
                        None => return Err(child.id),
                    }
                }
                node = child;
                len += 1;
                at += skip;
            }
        }
        if shortest == 1 {
            shortest = 2;
            if shortest > spec.max_len {
                break;
            }
        }
    }
    Ok(())
}

/// The n-gram counts of each of `rows` equal rows of `items`, row-major
/// [rows, width].
fn count_grams<K: Eq + Hash + Copy>(
    cx: &OpCtx,
    pool: &[K],
    items: &[K],
    rows: usize,
    spec: &GramSpec,
) -> Result<Vec<u64>, EvalError> {
    let mut counts = vec![0u64; rows * spec.width];
    if items.is_empty() || rows == 0 {
        return Ok(counts);
    }
    let trie = gram_trie(pool, &spec.ngram_counts, spec.min_len, spec.max_len);
    let row_len = items.len() / rows;
    for (row, out) in items.chunks(row_len).zip(counts.chunks_mut(spec.width)) {
        if let Err(id) = count_row(&trie, spec, row, out) {
            return cx.err(format!(
                "TfIdfVectorizer: n-gram {id} of the pool has no entry in ngram_indexes \
                 ({} entries)",
                spec.ngram_indexes.len()
            ));
        }
    }
    Ok(counts)
}

/// The largest output TfIdfVectorizer makes, in elements.
const MAX_TFIDF_ELEMENTS: usize = 1 << 32;

/// TfIdfVectorizer: counts the pool's n-grams (with skips) in each row of
/// a [C] or [N, C] input of int32, int64 or strings, and weighs them per
/// `mode`; float32 output of [max(ngram_indexes) + 1] or [N, that].
/// Follows onnx's reference implementation (and ONNX Runtime): `weights`
/// is indexed by output column.
pub fn tfidf_vectorizer(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let x = input(cx, inputs, 0)?;
    let mode = match cx.string_attr("mode", "")?.as_str() {
        "TF" => Weighting::Tf,
        "IDF" => Weighting::Idf,
        "TFIDF" => Weighting::TfIdf,
        "" => return cx.err("TfIdfVectorizer: attribute 'mode' is missing"),
        other => {
            return cx.err(format!(
                "TfIdfVectorizer: mode '{other}' is not one of TF, IDF, TFIDF"
            ))
        }
    };
    let min_len = cx.int_attr("min_gram_length", 0)?;
    let max_len = cx.int_attr("max_gram_length", 0)?;
    let max_skip = cx.int_attr("max_skip_count", -1)?;
    if min_len < 1 || max_len < min_len {
        return cx.err(format!(
            "TfIdfVectorizer: min_gram_length {min_len} and max_gram_length {max_len} must \
             satisfy 1 <= min <= max"
        ));
    }
    if max_skip < 0 {
        return cx.err("TfIdfVectorizer: max_skip_count must be given and not negative");
    }
    let pool_ints = cx.ints_attr("pool_int64s")?.unwrap_or_default();
    let pool_strings = strings_attr(cx, "pool_strings")?;
    let pool_len = match (pool_ints.is_empty(), pool_strings.is_empty()) {
        (false, true) => pool_ints.len(),
        (true, false) => pool_strings.len(),
        (false, false) => {
            return cx.err("TfIdfVectorizer: only one of pool_int64s and pool_strings may be set")
        }
        (true, true) => {
            return cx.err("TfIdfVectorizer: neither pool_int64s nor pool_strings is set")
        }
    };
    let Some(ngram_counts) = cx.ints_attr("ngram_counts")? else {
        return cx.err("TfIdfVectorizer: attribute 'ngram_counts' is missing");
    };
    let ngram_counts: Vec<usize> = ngram_counts
        .iter()
        .map(|&c| usize::try_from(c).ok().filter(|&c| c <= pool_len))
        .collect::<Option<_>>()
        .map_or_else(
            || {
                cx.err(format!(
                    "TfIdfVectorizer: ngram_counts {ngram_counts:?} must lie in 0..={pool_len} \
                     (the pool's size)"
                ))
            },
            Ok,
        )?;
    let ngram_indexes: Vec<usize> = match cx.ints_attr("ngram_indexes")? {
        Some(v) if !v.is_empty() => v
            .iter()
            .map(|&i| usize::try_from(i).ok())
            .collect::<Option<_>>()
            .map_or_else(
                || cx.err("TfIdfVectorizer: ngram_indexes must not be negative"),
                Ok,
            )?,
        _ => return cx.err("TfIdfVectorizer: attribute 'ngram_indexes' is missing or empty"),
    };
    let width = ngram_indexes.iter().max().map_or(0, |m| m + 1);
    let weights = cx.floats_attr("weights")?.unwrap_or_default();
    if mode != Weighting::Tf && !weights.is_empty() && weights.len() < width {
        return cx.err(format!(
            "TfIdfVectorizer: weights has {} entries, fewer than the {width} output columns",
            weights.len()
        ));
    }

    let (rows, batched) = match x.shape() {
        [] => (1, false),
        [_] => (1, false),
        [0, _] => return cx.err("TfIdfVectorizer: a [N, C] input needs N > 0"),
        &[n, _] => (n, true),
        s => {
            return cx.err(format!(
                "TfIdfVectorizer takes a [C] or [N, C] input, not shape {s:?}"
            ))
        }
    };
    if rows
        .checked_mul(width)
        .is_none_or(|n| n > MAX_TFIDF_ELEMENTS)
    {
        return cx.err(format!(
            "TfIdfVectorizer: an output of {rows} x {width} is too large"
        ));
    }
    let spec = GramSpec {
        ngram_counts,
        min_len: min_len as usize,
        max_len: max_len as usize,
        max_skip: max_skip as usize,
        ngram_indexes,
        width,
    };
    let int_items: Option<Vec<i64>> = match x {
        Tensor::I32(a) => Some(a.iter().map(|&v| v as i64).collect()),
        Tensor::I64(a) => Some(a.iter().copied().collect()),
        _ => None,
    };
    let counts = match (x, int_items) {
        (_, Some(items)) if !pool_ints.is_empty() => {
            count_grams(cx, &pool_ints, &items, rows, &spec)?
        }
        (Tensor::String(a), _) if !pool_strings.is_empty() => {
            let pool: Vec<&[u8]> = pool_strings.iter().map(Vec::as_slice).collect();
            let items: Vec<&[u8]> = a.iter().map(Vec::as_slice).collect();
            count_grams(cx, &pool, &items, rows, &spec)?
        }
        (t, _) => {
            let pool = if pool_ints.is_empty() {
                "pool_strings takes a string input"
            } else {
                "pool_int64s takes an int32 or int64 input"
            };
            return cx.err(format!(
                "TfIdfVectorizer: input is {}, but {pool}",
                t.dtype()
            ));
        }
    };
    let values: Vec<f32> = counts
        .iter()
        .enumerate()
        .map(|(k, &count)| {
            let weight = weights.get(k % width.max(1)).map(|&w| w as f64);
            let count = count as f64;
            let v = match (mode, weight) {
                (Weighting::Tf, _) | (Weighting::TfIdf, None) => count,
                (Weighting::Idf, w) if count > 0.0 => w.unwrap_or(1.0),
                (Weighting::Idf, _) => 0.0,
                (Weighting::TfIdf, Some(w)) => w * count,
            };
            v as f32
        })
        .collect();
    let shape = if batched {
        vec![rows, width]
    } else {
        vec![width]
    };
    let y = ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| EvalError::Op {
        node: cx.describe(),
        message: e.to_string(),
    })?;
    Ok(vec![Tensor::F32(y)])
}

#[cfg(test)]
mod tests {
    use super::split_whitespace;
    use crate::EvalError;
    use qgraph_ir::ndarray::{ArrayD, IxDyn};
    use qgraph_ir::{AttrValue, Graph, NewNode, Tensor, ValueId};

    /// Runs one node of `op` (opset 10) on `inputs`.
    fn run(
        op: &str,
        attrs: Vec<(&str, AttrValue)>,
        inputs: &[&Tensor],
    ) -> Result<Tensor, EvalError> {
        let mut g = Graph::new("test");
        let ins: Vec<ValueId> = (0..inputs.len())
            .map(|k| g.add_input(format!("in{k}"), None).unwrap())
            .collect();
        let out = g.add_value("out", None).unwrap();
        let mut node = NewNode::new(op).inputs(ins).outputs([out]);
        for (name, value) in attrs {
            node = node.attr(name, value);
        }
        let id = g.add_node(node).unwrap();
        let inputs: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        Ok(crate::run_node(&g, id, 10, &inputs)?.remove(0))
    }

    fn strs(shape: &[usize], v: &[&str]) -> Tensor {
        let v = v.iter().map(|s| s.as_bytes().to_vec()).collect();
        Tensor::String(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
    }
    fn ints(v: &[i64]) -> AttrValue {
        AttrValue::Ints(v.to_vec())
    }
    fn text(s: &str) -> AttrValue {
        AttrValue::String(s.as_bytes().to_vec())
    }
    fn texts(v: &[&str]) -> AttrValue {
        AttrValue::Strings(v.iter().map(|s| s.as_bytes().to_vec()).collect())
    }
    fn f32s(t: &Tensor) -> (Vec<usize>, Vec<f32>) {
        match t {
            Tensor::F32(a) => (a.shape().to_vec(), a.iter().copied().collect()),
            t => panic!("expected float32, found {}", t.dtype()),
        }
    }
    fn strings_of(t: &Tensor) -> (Vec<usize>, Vec<String>) {
        match t {
            Tensor::String(a) => (
                a.shape().to_vec(),
                a.iter()
                    .map(|s| String::from_utf8(s.clone()).unwrap())
                    .collect(),
            ),
            t => panic!("expected strings, found {}", t.dtype()),
        }
    }

    #[test]
    fn whitespace_split_follows_python() {
        assert_eq!(split_whitespace("  a b  c ", None), ["a", "b", "c"]);
        assert_eq!(split_whitespace("  a b  c ", Some(1)), ["a", "b  c "]);
        assert!(split_whitespace("   ", None).is_empty());
        assert!(split_whitespace("", Some(0)).is_empty());
    }

    /// The attributes of onnx's uni- and bigram node tests (skip 5).
    fn uni_and_bigrams(mode: &str) -> Vec<(&'static str, AttrValue)> {
        vec![
            ("mode", text(mode)),
            ("min_gram_length", AttrValue::Int(1)),
            ("max_gram_length", AttrValue::Int(2)),
            ("max_skip_count", AttrValue::Int(5)),
            ("ngram_counts", ints(&[0, 4])),
            ("ngram_indexes", ints(&[0, 1, 2, 3, 4, 5, 6])),
        ]
    }
    const POOL: [i64; 10] = [2, 3, 5, 4, 5, 6, 7, 8, 6, 7];
    const ROWS: [i64; 12] = [1, 1, 3, 3, 3, 7, 8, 6, 7, 5, 6, 8];
    const WEIGHTS: [f32; 7] = [0.5, 0.25, 2.0, 1.5, 3.0, 0.125, 4.0];

    #[test]
    fn tfidf_counts_uni_and_bigrams_with_skips_in_int32_and_int64() {
        let mut attrs = uni_and_bigrams("TF");
        attrs.push(("pool_int64s", ints(&POOL)));
        let x32 = Tensor::I32(
            ArrayD::from_shape_vec(IxDyn(&[12]), ROWS.map(|v| v as i32).to_vec()).unwrap(),
        );
        let y = run("TfIdfVectorizer", attrs.clone(), &[&x32]).unwrap();
        assert_eq!(f32s(&y), (vec![7], vec![0., 3., 1., 0., 1., 3., 1.]));
        let x64 = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2, 6]), ROWS.to_vec()).unwrap());
        let y = run("TfIdfVectorizer", attrs, &[&x64]).unwrap();
        assert_eq!(
            f32s(&y),
            (
                vec![2, 7],
                vec![0., 3., 0., 0., 0., 0., 0., 0., 0., 1., 0., 1., 1., 1.]
            )
        );
    }

    #[test]
    fn tfidf_weighs_by_output_column() {
        // Expected values from onnx's reference and ONNX Runtime.
        let x = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2, 6]), ROWS.to_vec()).unwrap());
        let cases: [(&str, bool, [f32; 14]); 4] = [
            (
                "TFIDF",
                true,
                [0., 0.75, 0., 0., 0., 0., 0., 0., 0., 2., 0., 3., 0.125, 4.],
            ),
            (
                "IDF",
                true,
                [0., 0.25, 0., 0., 0., 0., 0., 0., 0., 2., 0., 3., 0.125, 4.],
            ),
            (
                "IDF",
                false,
                [0., 1., 0., 0., 0., 0., 0., 0., 0., 1., 0., 1., 1., 1.],
            ),
            (
                "TFIDF",
                false,
                [0., 3., 0., 0., 0., 0., 0., 0., 0., 1., 0., 1., 1., 1.],
            ),
        ];
        for (mode, weighted, expected) in cases {
            let mut attrs = uni_and_bigrams(mode);
            attrs.push(("pool_int64s", ints(&POOL)));
            if weighted {
                attrs.push(("weights", AttrValue::Floats(WEIGHTS.to_vec())));
            }
            let y = run("TfIdfVectorizer", attrs, &[&x]).unwrap();
            assert_eq!(
                f32s(&y),
                (vec![2, 7], expected.to_vec()),
                "{mode} {weighted}"
            );
        }
    }

    #[test]
    fn tfidf_matches_strings_against_pool_strings() {
        let letters = |v: &[i64]| -> Vec<String> {
            v.iter()
                .map(|&i| ((b'a' + i as u8 - 1) as char).to_string())
                .collect()
        };
        let pool = letters(&POOL);
        let rows = letters(&ROWS);
        let mut attrs = uni_and_bigrams("TFIDF");
        attrs.push((
            "pool_strings",
            texts(&pool.iter().map(String::as_str).collect::<Vec<_>>()),
        ));
        attrs.push(("weights", AttrValue::Floats(WEIGHTS.to_vec())));
        let x = strs(
            &[2, 6],
            &rows.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let y = run("TfIdfVectorizer", attrs, &[&x]).unwrap();
        assert_eq!(
            f32s(&y).1,
            vec![0., 0.75, 0., 0., 0., 0., 0., 0., 0., 2., 0., 3., 0.125, 4.]
        );
    }

    #[test]
    fn tfidf_numbers_every_level_but_stores_only_the_lengths_asked() {
        // Level 1: [9]; level 2: [1,2] [2,3]; level 3: [1,2,3] [2,3,4].
        let pool = [9, 1, 2, 2, 3, 1, 2, 3, 2, 3, 4];
        let x = Tensor::I64(
            ArrayD::from_shape_vec(IxDyn(&[9]), vec![1, 2, 3, 1, 2, 3, 4, 1, 2]).unwrap(),
        );
        for (min, skip) in [(2, 1), (1, 0)] {
            let attrs = vec![
                ("mode", text("TF")),
                ("min_gram_length", AttrValue::Int(min)),
                ("max_gram_length", AttrValue::Int(3)),
                ("max_skip_count", AttrValue::Int(skip)),
                ("ngram_counts", ints(&[0, 1, 5])),
                ("ngram_indexes", ints(&[4, 3, 2, 1, 0])),
                ("pool_int64s", ints(&pool)),
            ];
            let y = run("TfIdfVectorizer", attrs, &[&x]).unwrap();
            assert_eq!(f32s(&y), (vec![5], vec![1., 2., 2., 3., 0.]));
        }
    }

    #[test]
    fn tfidf_empty_rows_and_refusals() {
        let attrs = vec![
            ("mode", text("TF")),
            ("min_gram_length", AttrValue::Int(1)),
            ("max_gram_length", AttrValue::Int(1)),
            ("max_skip_count", AttrValue::Int(0)),
            ("ngram_counts", ints(&[0])),
            ("ngram_indexes", ints(&[1])),
            ("pool_int64s", ints(&[7])),
        ];
        let empty = Tensor::I32(ArrayD::from_shape_vec(IxDyn(&[2, 0]), vec![]).unwrap());
        let y = run("TfIdfVectorizer", attrs.clone(), &[&empty]).unwrap();
        assert_eq!(f32s(&y), (vec![2, 2], vec![0.; 4]));
        let cube = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[1, 1, 1]), vec![7]).unwrap());
        let e = run("TfIdfVectorizer", attrs.clone(), &[&cube]).unwrap_err();
        assert!(e.to_string().contains("[C] or [N, C]"), "{e}");
        let words = strs(&[1], &["7"]);
        let e = run("TfIdfVectorizer", attrs.clone(), &[&words]).unwrap_err();
        assert!(
            e.to_string()
                .contains("pool_int64s takes an int32 or int64 input"),
            "{e}"
        );
        let floats = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[1]), vec![7.0]).unwrap());
        assert!(run("TfIdfVectorizer", attrs.clone(), &[&floats]).is_err());
        let mut bad = attrs;
        bad[4] = ("ngram_counts", ints(&[0, 5]));
        let one = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[1]), vec![7]).unwrap());
        let e = run("TfIdfVectorizer", bad, &[&one]).unwrap_err();
        assert!(e.to_string().contains("ngram_counts"), "{e}");
    }

    #[test]
    fn string_normalizer_drops_stopwords_then_changes_case() {
        let x = strs(
            &[1, 6],
            &[
                "Monday",
                "tuesday",
                "wednesday",
                "Monday",
                "tuesday",
                "wednesday",
            ],
        );
        let attrs = vec![
            ("case_change_action", text("UPPER")),
            ("stopwords", texts(&["monday"])),
        ];
        let y = run("StringNormalizer", attrs, &[&x]).unwrap();
        assert_eq!(
            strings_of(&y),
            (
                vec![1, 4],
                vec![
                    "TUESDAY".into(),
                    "WEDNESDAY".into(),
                    "TUESDAY".into(),
                    "WEDNESDAY".into()
                ]
            )
        );
        // Case-sensitive: only the exact stopword goes.
        let x = strs(&[3], &["Monday", "monday", "MONDAY"]);
        let attrs = vec![
            ("case_change_action", text("LOWER")),
            ("is_case_sensitive", AttrValue::Int(1)),
            ("stopwords", texts(&["monday"])),
        ];
        let y = run("StringNormalizer", attrs, &[&x]).unwrap();
        assert_eq!(
            strings_of(&y),
            (vec![2], vec!["monday".into(), "monday".into()])
        );
    }

    #[test]
    fn string_normalizer_leaves_one_empty_string_when_all_go() {
        let attrs = vec![("stopwords", texts(&["a", "B"]))];
        let y = run(
            "StringNormalizer",
            attrs.clone(),
            &[&strs(&[2], &["A", "b"])],
        )
        .unwrap();
        assert_eq!(strings_of(&y), (vec![1], vec![String::new()]));
        let y = run("StringNormalizer", attrs, &[&strs(&[1, 2], &["A", "b"])]).unwrap();
        assert_eq!(strings_of(&y), (vec![1, 1], vec![String::new()]));
    }

    #[test]
    fn string_normalizer_maps_case_by_unicode_default_rules() {
        let x = strs(&[3], &["Straße", "École", "ΌΣΟΣ"]);
        let y = run(
            "StringNormalizer",
            vec![("case_change_action", text("UPPER"))],
            &[&x],
        )
        .unwrap();
        assert_eq!(strings_of(&y).1, ["STRASSE", "ÉCOLE", "ΌΣΟΣ"]);
        let y = run(
            "StringNormalizer",
            vec![("case_change_action", text("LOWER"))],
            &[&x],
        )
        .unwrap();
        assert_eq!(strings_of(&y).1, ["straße", "école", "όσος"]);
        let y = run(
            "StringNormalizer",
            vec![("locale", text("en_US.UTF-8"))],
            &[&x],
        )
        .unwrap();
        assert_eq!(strings_of(&y).1, ["Straße", "École", "ΌΣΟΣ"]);
    }

    #[test]
    fn string_normalizer_refusals() {
        let turkish = vec![
            ("case_change_action", text("LOWER")),
            ("locale", text("tr_TR")),
        ];
        let e = run("StringNormalizer", turkish, &[&strs(&[1], &["I"])]).unwrap_err();
        assert!(e.to_string().contains("tr_TR"), "{e}");
        let e = run(
            "StringNormalizer",
            vec![],
            &[&strs(&[2, 2], &["a", "b", "c", "d"])],
        )
        .unwrap_err();
        assert!(e.to_string().contains("[C] or [1, C]"), "{e}");
        let bad = Tensor::String(ArrayD::from_shape_vec(IxDyn(&[1]), vec![vec![0xff]]).unwrap());
        let e = run("StringNormalizer", vec![], &[&bad]).unwrap_err();
        assert!(e.to_string().contains("UTF-8"), "{e}");
        let e = run(
            "StringNormalizer",
            vec![("case_change_action", text("TITLE"))],
            &[&strs(&[1], &["a"])],
        )
        .unwrap_err();
        assert!(e.to_string().contains("TITLE"), "{e}");
    }
}
