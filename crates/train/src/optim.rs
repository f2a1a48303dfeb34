//! Optimizers and learning-rate schedules.

use std::f32::consts::PI;

/// How parameters move along their gradients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// SGD with momentum (PyTorch's form: `v = mu v + g`, `p -= lr v`);
    /// weight decay adds `wd p` to the gradient.
    Sgd { momentum: f32 },
    /// Adam with decoupled weight decay (AdamW, Loshchilov & Hutter).
    Adam { beta1: f32, beta2: f32, eps: f32 },
}

impl Optimizer {
    pub fn adam() -> Optimizer {
        Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// The learning rate over training, as a factor of the base rate at step
/// `t` of `total`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    /// `(1 + cos(pi t / T)) / 2`.
    Cosine,
    /// `gamma^floor(t / every)`.
    Step {
        every: usize,
        gamma: f32,
    },
    /// `sin(pi t / T)`, taken at the middle of each step so that neither
    /// the first nor the last has rate 0: fine-tuning that warms up and
    /// cools down.
    Sine,
}

impl Schedule {
    /// Parses `constant`, `cosine`, `sine` or `step:EVERY:GAMMA` (steps).
    pub fn parse(text: &str) -> Result<Schedule, String> {
        match text {
            "constant" => Ok(Schedule::Constant),
            "cosine" => Ok(Schedule::Cosine),
            "sine" => Ok(Schedule::Sine),
            _ => {
                let parts: Vec<&str> = text.split(':').collect();
                match parts.as_slice() {
                    ["step", every, gamma] => Ok(Schedule::Step {
                        every: every
                            .parse()
                            .ok()
                            .filter(|&e: &usize| e > 0)
                            .ok_or(format!(
                                "schedule '{text}': EVERY must be a positive step count"
                            ))?,
                        gamma: gamma
                            .parse()
                            .map_err(|_| format!("schedule '{text}': GAMMA must be a number"))?,
                    }),
                    _ => Err(format!(
                        "unknown schedule '{text}' (constant, cosine, sine, step:EVERY:GAMMA)"
                    )),
                }
            }
        }
    }

    pub fn factor(&self, t: usize, total: usize) -> f32 {
        let total = total.max(1) as f32;
        match *self {
            Schedule::Constant => 1.0,
            Schedule::Cosine => 0.5 * (1.0 + (PI * t as f32 / total).cos()),
            Schedule::Step { every, gamma } => gamma.powi((t / every.max(1)) as i32),
            Schedule::Sine => (PI * (t as f32 + 0.5) / total).sin(),
        }
    }
}

/// Per-parameter state of an optimizer.
#[derive(Clone, Debug, Default)]
pub struct Moments {
    first: Vec<f32>,
    second: Vec<f32>,
    steps: i32,
}

impl Moments {
    /// One update of `param` by `grad` at rate `lr`, with weight decay `wd`.
    pub fn update(&mut self, opt: Optimizer, param: &mut [f32], grad: &[f32], lr: f32, wd: f32) {
        if self.first.len() != param.len() {
            self.first = vec![0.0; param.len()];
        }
        self.steps += 1;
        match opt {
            Optimizer::Sgd { momentum } => {
                for ((p, &g), v) in param.iter_mut().zip(grad).zip(&mut self.first) {
                    let g = g + wd * *p;
                    *v = momentum * *v + g;
                    *p -= lr * *v;
                }
            }
            Optimizer::Adam { beta1, beta2, eps } => {
                if self.second.len() != param.len() {
                    self.second = vec![0.0; param.len()];
                }
                let c1 = 1.0 - beta1.powi(self.steps);
                let c2 = 1.0 - beta2.powi(self.steps);
                for (((p, &g), m), v) in param
                    .iter_mut()
                    .zip(grad)
                    .zip(&mut self.first)
                    .zip(&mut self.second)
                {
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    *p -= lr * wd * *p;
                    *p -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_have_their_shapes() {
        assert_eq!(Schedule::Cosine.factor(0, 10), 1.0);
        assert!(Schedule::Cosine.factor(10, 10).abs() < 1e-6);
        let sine: Vec<f32> = (0..10).map(|t| Schedule::Sine.factor(t, 10)).collect();
        assert!(sine[0] > 0.0 && sine[9] > 0.0 && (sine[4] - sine[5]).abs() < 1e-6);
        assert!(sine[4] > 0.98);
        let step = Schedule::parse("step:3:0.1").unwrap();
        assert_eq!(step.factor(2, 9), 1.0);
        assert!((step.factor(3, 9) - 0.1).abs() < 1e-7);
        assert!(Schedule::parse("step:0:0.1").is_err());
        assert!(Schedule::parse("linear").unwrap_err().contains("linear"));
    }

    #[test]
    fn optimizers_minimise_a_quadratic() {
        for opt in [Optimizer::Sgd { momentum: 0.9 }, Optimizer::adam()] {
            let mut p = vec![3.0f32, -2.0];
            let mut m = Moments::default();
            for _ in 0..500 {
                let g: Vec<f32> = p.iter().map(|x| 2.0 * x).collect();
                m.update(opt, &mut p, &g, 0.02, 0.0);
            }
            assert!(p.iter().all(|x| x.abs() < 1e-2), "{opt:?}: {p:?}");
        }
    }

    #[test]
    fn sgd_takes_pytorchs_first_step() {
        // v = g + wd p, p -= lr v: from p = 1, g = 0.5, wd = 0.1, lr = 0.1.
        let mut p = vec![1.0f32];
        let mut m = Moments::default();
        m.update(Optimizer::Sgd { momentum: 0.9 }, &mut p, &[0.5], 0.1, 0.1);
        assert!((p[0] - 0.94).abs() < 1e-7);
        m.update(Optimizer::Sgd { momentum: 0.9 }, &mut p, &[0.5], 0.1, 0.1);
        // v = 0.9 * 0.6 + 0.5 + 0.094 = 1.134.
        assert!((p[0] - (0.94 - 0.1134)).abs() < 1e-6);
    }
}
