//! Losses on a batch of logits (the first output, one row per sample):
//! their mean over the batch, and its gradient.

/// Softmax of `row / temperature`, in f64.
fn softmax(row: &[f32], temperature: f64) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = row
        .iter()
        .map(|&v| ((v as f64 - max) / temperature).exp())
        .collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// Mean cross-entropy of the rows of `logits` (`rows` of them) against
/// integer labels, and its gradient.
pub fn cross_entropy(
    logits: &[f32],
    rows: usize,
    labels: &[i64],
) -> Result<(f64, Vec<f32>), String> {
    let width = logits.len() / rows.max(1);
    let mut grad = vec![0f32; logits.len()];
    let mut total = 0.0;
    for (r, &label) in labels.iter().enumerate().take(rows) {
        let row = &logits[r * width..][..width];
        if label < 0 || label as usize >= width {
            return Err(format!(
                "label {label} is outside the model's {width} classes"
            ));
        }
        let p = softmax(row, 1.0);
        total -= p[label as usize].max(1e-300).ln();
        for (c, (g, &pc)) in grad[r * width..][..width].iter_mut().zip(&p).enumerate() {
            let target = (c == label as usize) as u8 as f64;
            *g = ((pc - target) / rows as f64) as f32;
        }
    }
    Ok((total / rows.max(1) as f64, grad))
}

/// Knowledge distillation (Hinton et al. 2015): the mean over rows of
/// `T^2 KL(softmax(t / T) || softmax(s / T))`, and its gradient with
/// respect to the student's logits `s`, `T (softmax(s/T) - softmax(t/T))`
/// per row.
pub fn distillation(
    student: &[f32],
    teacher: &[f32],
    rows: usize,
    temperature: f32,
) -> Result<(f64, Vec<f32>), String> {
    if student.len() != teacher.len() {
        return Err(format!(
            "the student gives {} logits per batch, the teacher {}",
            student.len(),
            teacher.len()
        ));
    }
    let t = temperature as f64;
    let width = student.len() / rows.max(1);
    let mut grad = vec![0f32; student.len()];
    let mut total = 0.0;
    for r in 0..rows {
        let ps = softmax(&student[r * width..][..width], t);
        let pt = softmax(&teacher[r * width..][..width], t);
        for (c, g) in grad[r * width..][..width].iter_mut().enumerate() {
            if pt[c] > 0.0 {
                total += t * t * pt[c] * (pt[c].ln() - ps[c].max(1e-300).ln());
            }
            *g = (t * (ps[c] - pt[c]) / rows as f64) as f32;
        }
    }
    Ok((total / rows.max(1) as f64, grad))
}

/// How many of the `rows` rows of `logits` have their largest value (the
/// first, on ties) at their label.
pub fn correct_top1(logits: &[f32], rows: usize, labels: &[i64]) -> usize {
    let width = logits.len() / rows.max(1);
    (0..rows)
        .filter(|&r| {
            let row = &logits[r * width..][..width];
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0;
            labels.get(r) == Some(&(best as i64))
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(f: impl Fn(&[f32]) -> f64, x: &[f32], i: usize) -> f64 {
        let eps = 1e-3;
        let mut a = x.to_vec();
        a[i] += eps;
        let up = f(&a);
        a[i] -= 2.0 * eps;
        (up - f(&a)) / (2.0 * eps as f64)
    }

    #[test]
    fn gradients_match_central_differences() {
        let logits = [0.3f32, -1.2, 2.0, 0.1, 0.5, -0.4];
        let labels = [2i64, 0];
        let (_, g) = cross_entropy(&logits, 2, &labels).unwrap();
        for (i, &gi) in g.iter().enumerate() {
            let n = numeric(|x| cross_entropy(x, 2, &labels).unwrap().0, &logits, i);
            assert!((gi as f64 - n).abs() < 1e-4, "{i}: {gi} against {n}");
        }
        let teacher = [1.0f32, 0.0, -1.0, 0.2, 0.2, 0.9];
        let (loss, g) = distillation(&logits, &teacher, 2, 2.0).unwrap();
        assert!(loss > 0.0);
        for (i, &gi) in g.iter().enumerate() {
            let n = numeric(|x| distillation(x, &teacher, 2, 2.0).unwrap().0, &logits, i);
            assert!((gi as f64 - n).abs() < 1e-4, "{i}: {gi} against {n}");
        }
        assert!(distillation(&teacher, &teacher, 2, 1.0).unwrap().0.abs() < 1e-12);
        assert!(cross_entropy(&logits, 2, &[3, 0])
            .unwrap_err()
            .contains("label 3"));
    }
}
