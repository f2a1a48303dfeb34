//! `qgraph report`: where a quantized model loses accuracy. Each quantized
//! tensor (the output of a DequantizeLinear whose QuantizeLinear reads a
//! value of the float model's name) is compared with its float twin on the
//! same data: the SQNR in dB of the quantized graph's value against the float
//! graph's, so errors that grow from layer to layer show where they grow.
//! Weights are compared with the float values they quantize. Sums are kept per
//! tensor, batch by batch; no activation is stored.

use crate::data::{Dataset, Norm};
use qgraph_eval::Evaluator;
use qgraph_ir::{Graph, Model, Tensor, ValueId};
use std::collections::HashMap;

/// One quantized tensor's error.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The float model's name of the tensor.
    pub name: String,
    pub weight: bool,
    /// Position in the quantized graph's order (for the chart).
    pub order: usize,
    pub sqnr_db: f64,
}

/// The quantized tensors of `quant` whose float twin exists in `float`:
/// (name, DequantizeLinear output in `quant`, float twin, is weight); the
/// twin of an activation is in `float`, that of a weight in `quant`.
fn pairs(float: &Graph, quant: &Graph) -> Result<Vec<(String, ValueId, ValueId, bool)>, String> {
    let order = quant
        .topo_order()
        .map_err(|_| "the quantized model has a cycle".to_string())?;
    let mut out = Vec::new();
    for n in order {
        let node = quant.node(n);
        if !node.domain.is_empty() || node.op_type != "DequantizeLinear" {
            continue;
        }
        let (Some(Some(q)), Some(Some(dq))) = (node.inputs().first(), node.outputs().first())
        else {
            continue;
        };
        let Some((qn, _)) = quant.producer(*q) else {
            continue;
        };
        let qnode = quant.node(qn);
        if qnode.op_type != "QuantizeLinear" {
            continue;
        }
        let Some(Some(mut source)) = qnode.inputs().first().copied() else {
            continue;
        };
        // Through a Clip to a narrower grid, to the value it clips.
        if let Some((c, _)) = quant.producer(source) {
            if quant.node(c).op_type == "Clip" && quant.node(c).name().ends_with("_Clip") {
                if let Some(Some(v)) = quant.node(c).inputs().first() {
                    source = *v;
                }
            }
        }
        // The float value the pair stands for: recorded by `insert` (a
        // folded Relu's output is no longer in the graph), else its input.
        let recorded = node
            .meta
            .iter()
            .find(|(k, _)| k == qgraph_passes::QUANTIZES_KEY)
            .map(|(_, v)| v.clone());
        let name = recorded.unwrap_or_else(|| quant.value(source).name().to_string());
        // A weight's twin is its float value in the quantized model (the
        // float model's may be before batch normalization was folded in).
        if quant.initializer(source).is_some() {
            out.push((name, *dq, source, true));
        } else if let Some(twin) = float.value_by_name(&name) {
            out.push((name, *dq, twin, false));
        }
    }
    Ok(out)
}

fn add_error(sums: &mut (f64, f64), reference: &Tensor, other: &Tensor) {
    if let (Tensor::F32(a), Tensor::F32(b)) = (reference, other) {
        if a.shape() == b.shape() {
            for (x, y) in a.iter().zip(b.iter()) {
                sums.0 += (*x as f64).powi(2);
                sums.1 += (*x as f64 - *y as f64).powi(2);
            }
        }
    }
}

fn db(signal: f64, noise: f64) -> f64 {
    if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / noise).log10()
    }
}

/// The SQNR of every quantized tensor over `samples` of `data`, worst first.
pub fn report(
    float: &Model,
    quant: &Model,
    data: &Dataset,
    samples: &[usize],
    norm: Norm,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Row>, crate::Error> {
    data.check_norm(norm)?;
    let pairs = pairs(&float.graph, &quant.graph)?;
    if pairs.is_empty() {
        return Err(
            "no QuantizeLinear in the quantized model reads a value of the float model's names"
                .into(),
        );
    }
    let fev = Evaluator::new(float).map_err(|e| format!("float model: {e}"))?;
    let qev = Evaluator::new(quant).map_err(|e| format!("quantized model: {e}"))?;
    let mut sums: HashMap<usize, (f64, f64)> = HashMap::new();
    let act: Vec<usize> = (0..pairs.len()).filter(|&i| !pairs[i].3).collect();
    let fwatch: Vec<ValueId> = act.iter().map(|&i| pairs[i].2).collect();
    let mut done = 0;
    for (b, chunk) in samples.chunks(batch.max(1)).enumerate() {
        // Every quantized activation; the quantized weights (constant) on
        // the first batch, against the float initializers.
        let qwatch: Vec<ValueId> = pairs
            .iter()
            .filter(|p| !p.3 || b == 0)
            .map(|p| p.1)
            .collect();
        let x = data.select(chunk, norm)?;
        // The float values of this batch, then each quantized one against
        // its twin as it is computed.
        let mut floats: HashMap<ValueId, Tensor> = HashMap::new();
        fev.run_observed(vec![x.clone()], &fwatch, &mut |v, t| {
            floats.insert(v, t.clone());
        })
        .map_err(|e| format!("float model: {e}"))?;
        qev.run_observed(vec![x], &qwatch, &mut |v, t| {
            for (i, (_, dq, twin, weight)) in pairs.iter().enumerate() {
                if *dq != v {
                    continue;
                }
                let reference = if *weight {
                    quant.graph.initializer(*twin).map(|init| &init.tensor)
                } else {
                    floats.get(twin)
                };
                if let Some(reference) = reference {
                    add_error(sums.entry(i).or_default(), reference, t);
                }
            }
        })
        .map_err(|e| format!("quantized model: {e}"))?;
        done += chunk.len();
        progress(done);
    }
    let mut rows: Vec<Row> = pairs
        .iter()
        .enumerate()
        .filter_map(|(i, (name, _, _, weight))| {
            let &(signal, noise) = sums.get(&i)?;
            Some(Row {
                name: name.clone(),
                weight: *weight,
                order: i,
                sqnr_db: db(signal, noise),
            })
        })
        .collect();
    rows.sort_by(|a, b| a.sqnr_db.total_cmp(&b.sqnr_db).then(a.order.cmp(&b.order)));
    Ok(rows)
}

/// The rows as a text table, worst first.
pub fn table(rows: &[Row]) -> String {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    let mut text = format!("{:<width$}  {:<10}  {:>9}\n", "tensor", "kind", "SQNR dB");
    for r in rows {
        text += &format!(
            "{:<width$}  {:<10}  {:>9.2}\n",
            r.name,
            if r.weight { "weight" } else { "activation" },
            r.sqnr_db
        );
    }
    text
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A horizontal bar chart of the SQNR of each tensor in graph order
/// (activations dark, weights light; shorter bars are worse), as SVG.
pub fn svg(rows: &[Row], title: &str) -> String {
    let mut ordered: Vec<&Row> = rows.iter().collect();
    ordered.sort_by_key(|r| r.order);
    let finite_max = ordered
        .iter()
        .map(|r| r.sqnr_db)
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max);
    let (bar_h, label_w, chart_w) = (14.0, 420.0, 480.0);
    let height = 40.0 + bar_h * ordered.len() as f64 + 30.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"monospace\" font-size=\"11\">\n",
        label_w + chart_w + 80.0
    );
    out += &format!(
        "<text x=\"4\" y=\"16\" font-size=\"13\">{} (SQNR of each quantized tensor against the float model, dB; shorter is worse)</text>\n",
        escape(title)
    );
    for (k, r) in ordered.iter().enumerate() {
        let y = 30.0 + bar_h * k as f64;
        let value = if r.sqnr_db.is_finite() {
            r.sqnr_db.max(0.0)
        } else {
            finite_max
        };
        let w = chart_w * value / finite_max;
        let colour = if r.weight { "#9ecae1" } else { "#3182bd" };
        out += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><rect x=\"{}\" y=\"{}\" width=\"{w:.1}\" height=\"{}\" fill=\"{colour}\"/><text x=\"{}\" y=\"{}\">{:.1}</text>\n",
            label_w - 4.0,
            y + 10.0,
            escape(&r.name),
            label_w,
            y + 1.0,
            bar_h - 2.0,
            label_w + w + 4.0,
            y + 10.0,
            r.sqnr_db
        );
    }
    out += "</svg>\n";
    out
}
