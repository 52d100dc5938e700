//! A gradient-free minimiser for a few dozen to a few hundred evaluations:
//! CMA-ES (Hansen's covariance matrix adaptation evolution strategy, the
//! `(mu/mu_w, lambda)` form of "The CMA Evolution Strategy: A Tutorial",
//! 2016) inside a box. `fit --optimizer gradient-free` uses it for
//! LoraHub's search of one weight per adapter (Huang et al. 2023), where each
//! evaluation is one forward pass over the shots.
//!
//! - **Budget**: exactly `budget` evaluations, the start point first; the
//!   last generation is cut short when the budget runs out.
//! - **Box**: every evaluated point is inside `[lower, upper]`. A sample
//!   outside is evaluated at its projection onto the box, and the squared
//!   distance to it is added to its ranking value (not to the value
//!   reported), so the search learns to stay inside.
//! - **Deterministic**: samples come from [`Rng`], the eigendecomposition is a
//!   cyclic Jacobi with a fixed order, so a seed gives the same points on
//!   every machine.

use crate::rng::Rng;

/// What [`minimize`] was asked to do.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The start point (the first one evaluated) and initial mean.
    pub start: Vec<f64>,
    /// Initial step size, in the units of the coordinates.
    pub sigma: f64,
    pub lower: f64,
    pub upper: f64,
    /// Evaluations, at least 1.
    pub budget: usize,
    pub seed: u64,
}

/// One evaluation: the point (inside the box) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub x: Vec<f64>,
    pub value: f64,
}

/// Every evaluation in order, and the index of the best (lowest value; the
/// earliest on ties). A non-finite value never counts as best, unless no
/// value is finite (then it is 0).
#[derive(Debug, Clone)]
pub struct Trace {
    pub evaluations: Vec<Evaluation>,
    pub best: usize,
}

/// Minimise `f` over the box with the budget of `p`. `f` may fail; its first
/// error ends the search and is returned.
pub fn minimize<E>(p: &Problem, mut f: impl FnMut(&[f64]) -> Result<f64, E>) -> Result<Trace, E> {
    let n = p.start.len();
    assert!(n >= 1 && p.budget >= 1 && p.lower < p.upper && p.sigma > 0.0);
    let clip = |x: &[f64]| -> Vec<f64> { x.iter().map(|v| v.clamp(p.lower, p.upper)).collect() };

    // Strategy parameters (tutorial, table 1).
    let nf = n as f64;
    let lambda = 4 + (3.0 * nf.ln()).floor() as usize;
    let mu = lambda / 2;
    let raw: Vec<f64> = (0..mu)
        .map(|i| ((lambda as f64 + 1.0) / 2.0).ln() - ((i + 1) as f64).ln())
        .collect();
    let total: f64 = raw.iter().sum();
    let weights: Vec<f64> = raw.iter().map(|w| w / total).collect();
    let mu_eff = 1.0 / weights.iter().map(|w| w * w).sum::<f64>();
    let c_sigma = (mu_eff + 2.0) / (nf + mu_eff + 5.0);
    let d_sigma = 1.0 + 2.0 * (((mu_eff - 1.0) / (nf + 1.0)).sqrt() - 1.0).max(0.0) + c_sigma;
    let c_c = (4.0 + mu_eff / nf) / (nf + 4.0 + 2.0 * mu_eff / nf);
    let c_1 = 2.0 / ((nf + 1.3).powi(2) + mu_eff);
    let c_mu = (1.0 - c_1).min(2.0 * (mu_eff - 2.0 + 1.0 / mu_eff) / ((nf + 2.0).powi(2) + mu_eff));
    let chi_n = nf.sqrt() * (1.0 - 1.0 / (4.0 * nf) + 1.0 / (21.0 * nf * nf));

    let mut rng = Rng(p.seed);
    let mut mean = p.start.clone();
    let mut sigma = p.sigma;
    let mut cov = identity(n);
    let (mut basis, mut scales) = (identity(n), vec![1.0; n]);
    let mut p_sigma = vec![0.0; n];
    let mut p_c = vec![0.0; n];

    let mut trace = Trace {
        evaluations: Vec::with_capacity(p.budget),
        best: 0,
    };
    let record = |x: Vec<f64>, value: f64, trace: &mut Trace| {
        let i = trace.evaluations.len();
        let best = &trace.evaluations.get(trace.best);
        if value.is_finite() && best.is_none_or(|b| !b.value.is_finite() || value < b.value) {
            trace.best = i;
        }
        trace.evaluations.push(Evaluation { x, value });
    };
    let start = clip(&p.start);
    let v = f(&start)?;
    record(start, v, &mut trace);

    let mut generation = 0u64;
    while trace.evaluations.len() < p.budget {
        generation += 1;
        // Sample: y = B D z, x = m + sigma y.
        let mut pop: Vec<(f64, Vec<f64>, Vec<f64>)> = Vec::with_capacity(lambda);
        for _ in 0..lambda {
            if trace.evaluations.len() >= p.budget {
                break;
            }
            let z: Vec<f64> = (0..n).map(|_| gaussian(&mut rng)).collect();
            let y: Vec<f64> = (0..n)
                .map(|i| (0..n).map(|j| basis[i][j] * scales[j] * z[j]).sum())
                .collect();
            let x: Vec<f64> = (0..n).map(|i| mean[i] + sigma * y[i]).collect();
            let inside = clip(&x);
            let value = f(&inside)?;
            let outside: f64 = x.iter().zip(&inside).map(|(a, b)| (a - b) * (a - b)).sum();
            let rank_value = if value.is_finite() {
                value + outside
            } else {
                f64::INFINITY
            };
            record(inside, value, &mut trace);
            pop.push((rank_value, x, y));
        }
        if pop.len() < lambda {
            // The budget ended inside this generation: nothing to update.
            break;
        }
        // Stable sort: ties keep sampling order.
        pop.sort_by(|a, b| a.0.total_cmp(&b.0));
        let old = mean.clone();
        let mut y_w = vec![0.0; n];
        for (w, (_, _, y)) in weights.iter().zip(&pop) {
            for i in 0..n {
                y_w[i] += w * y[i];
            }
        }
        for i in 0..n {
            mean[i] = old[i] + sigma * y_w[i];
        }
        // C^(-1/2) y_w = B D^-1 B^T y_w.
        let bt_y: Vec<f64> = (0..n)
            .map(|j| (0..n).map(|i| basis[i][j] * y_w[i]).sum::<f64>() / scales[j])
            .collect();
        let inv_sqrt_y: Vec<f64> = (0..n)
            .map(|i| (0..n).map(|j| basis[i][j] * bt_y[j]).sum())
            .collect();
        let k_s = (c_sigma * (2.0 - c_sigma) * mu_eff).sqrt();
        for i in 0..n {
            p_sigma[i] = (1.0 - c_sigma) * p_sigma[i] + k_s * inv_sqrt_y[i];
        }
        let ps_norm = p_sigma.iter().map(|v| v * v).sum::<f64>().sqrt();
        let decay = 1.0 - (1.0 - c_sigma).powi(2 * generation as i32);
        let h_sigma = ps_norm / decay.sqrt() / chi_n < 1.4 + 2.0 / (nf + 1.0);
        let k_c = (c_c * (2.0 - c_c) * mu_eff).sqrt();
        for i in 0..n {
            p_c[i] = (1.0 - c_c) * p_c[i] + if h_sigma { k_c * y_w[i] } else { 0.0 };
        }
        let delta_h = if h_sigma { 0.0 } else { c_c * (2.0 - c_c) };
        for i in 0..n {
            for j in 0..n {
                let rank_mu: f64 = weights
                    .iter()
                    .zip(&pop)
                    .map(|(w, (_, _, y))| w * y[i] * y[j])
                    .sum();
                cov[i][j] = (1.0 - c_1 - c_mu) * cov[i][j]
                    + c_1 * (p_c[i] * p_c[j] + delta_h * cov[i][j])
                    + c_mu * rank_mu;
            }
        }
        sigma *= ((c_sigma / d_sigma) * (ps_norm / chi_n - 1.0)).exp();
        // Keep the step within the box's scale: a diverging sigma only
        // samples corners.
        sigma = sigma.min(p.upper - p.lower);
        let (vectors, values) = jacobi_eigen(&cov);
        basis = vectors;
        scales = values.iter().map(|v| v.max(1e-20).sqrt()).collect();
    }
    Ok(trace)
}

fn identity(n: usize) -> Vec<Vec<f64>> {
    (0..n)
        .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
        .collect()
}

/// A standard normal value (Box-Muller, one of the pair).
fn gaussian(rng: &mut Rng) -> f64 {
    let u1 = 1.0 - rng.unit(); // in (0, 1]
    let u2 = rng.unit();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Eigenvectors (columns of the first result) and eigenvalues of a small
/// symmetric matrix, by cyclic Jacobi rotations until the off-diagonal part
/// is at rounding level. (Indexed loops: the rotations read as the
/// textbook's.)
#[allow(clippy::needless_range_loop)]
fn jacobi_eigen(a: &[Vec<f64>]) -> (Vec<Vec<f64>>, Vec<f64>) {
    let n = a.len();
    let mut a: Vec<Vec<f64>> = a.to_vec();
    // Symmetrise what rounding left.
    for i in 0..n {
        for j in 0..i {
            let m = 0.5 * (a[i][j] + a[j][i]);
            a[i][j] = m;
            a[j][i] = m;
        }
    }
    let mut v = identity(n);
    for _sweep in 0..64 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        let diag: f64 = (0..n).map(|i| a[i][i] * a[i][i]).sum();
        if off <= 1e-30 * diag.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q] == 0.0 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k][p], a[k][q]);
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p][k], a[q][k]);
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
                for row in v.iter_mut() {
                    let (vp, vq) = (row[p], row[q]);
                    row[p] = c * vp - s * vq;
                    row[q] = s * vp + c * vq;
                }
            }
        }
    }
    let values = (0..n).map(|i| a[i][i]).collect();
    (v, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(n: usize, budget: usize, seed: u64) -> Problem {
        Problem {
            start: vec![0.0; n],
            sigma: 0.5,
            lower: -1.5,
            upper: 1.5,
            budget,
            seed,
        }
    }

    fn run(p: &Problem, f: impl Fn(&[f64]) -> f64) -> Trace {
        minimize::<()>(p, |x| Ok(f(x))).unwrap()
    }

    #[test]
    fn finds_the_minimum_of_a_shifted_ill_conditioned_quadratic() {
        let target = [0.7, -0.3, 1.1, 0.2, -0.9];
        let f = |x: &[f64]| -> f64 {
            x.iter()
                .zip(target)
                .enumerate()
                .map(|(i, (a, t))| 10f64.powi(i as i32 % 3) * (a - t) * (a - t))
                .sum()
        };
        let t = run(&problem(5, 1200, 1), f);
        assert_eq!(t.evaluations.len(), 1200);
        let best = &t.evaluations[t.best];
        for (a, b) in best.x.iter().zip(target) {
            assert!((a - b).abs() < 1e-3, "{:?}", best.x);
        }
        assert_eq!(best.value, f(&best.x));
        // The best is the lowest value seen.
        assert!(t.evaluations.iter().all(|e| e.value >= best.value));
    }

    #[test]
    fn a_small_budget_is_spent_exactly_and_improves_on_the_start() {
        let f = |x: &[f64]| x.iter().map(|a| (a - 0.5) * (a - 0.5)).sum::<f64>();
        for budget in [1, 2, 9, 40] {
            let t = run(&problem(5, budget, 3), f);
            assert_eq!(t.evaluations.len(), budget);
            assert_eq!(t.evaluations[0].x, vec![0.0; 5], "the start comes first");
            if budget == 40 {
                assert!(t.evaluations[t.best].value < 0.5 * f(&[0.0; 5]));
            }
        }
    }

    #[test]
    fn every_point_is_inside_the_box_and_a_minimum_on_its_edge_is_found() {
        // The unconstrained minimum is at 3 in every coordinate.
        let f = |x: &[f64]| x.iter().map(|a| (a - 3.0) * (a - 3.0)).sum::<f64>();
        let t = run(&problem(4, 300, 7), f);
        assert!(t
            .evaluations
            .iter()
            .all(|e| e.x.iter().all(|v| (-1.5..=1.5).contains(v))));
        let best = &t.evaluations[t.best];
        assert!(best.x.iter().all(|v| *v > 1.45), "{:?}", best.x);
    }

    #[test]
    fn one_seed_gives_one_trace_and_errors_end_the_search() {
        let f = |x: &[f64]| x.iter().map(|a| a.abs()).sum::<f64>();
        let a = run(&problem(6, 50, 11), f);
        let b = run(&problem(6, 50, 11), f);
        let c = run(&problem(6, 50, 12), f);
        assert_eq!(a.evaluations, b.evaluations);
        assert_ne!(a.evaluations, c.evaluations);
        let mut calls = 0;
        let e = minimize(&problem(3, 50, 1), |_| {
            calls += 1;
            if calls == 5 {
                Err("stop")
            } else {
                Ok(1.0)
            }
        });
        assert_eq!(e.unwrap_err(), "stop");
        assert_eq!(calls, 5);
    }

    #[test]
    fn non_finite_values_are_never_best() {
        let f = |x: &[f64]| {
            if x[0] > 0.0 {
                f64::NAN
            } else {
                1.0 + x[0].abs()
            }
        };
        let t = run(&problem(2, 30, 5), f);
        assert!(t.evaluations[t.best].value.is_finite());
    }

    #[test]
    fn jacobi_diagonalises() {
        let a = vec![
            vec![4.0, 1.0, 0.5],
            vec![1.0, 3.0, 0.2],
            vec![0.5, 0.2, 1.0],
        ];
        let (v, d) = jacobi_eigen(&a);
        for k in 0..3 {
            for i in 0..3 {
                let av: f64 = (0..3).map(|j| a[i][j] * v[j][k]).sum();
                assert!((av - d[k] * v[i][k]).abs() < 1e-12);
            }
        }
    }
}
