"""E-step dual solvers side by side on identical batches: per-solve time, dual value reached, errors in eta and lambda.

    .venv/bin/python benchmarks/estep_solvers.py            # B=256, N=16/32/64, one and two constraints
    .venv/bin/python benchmarks/estep_solvers.py --quick    # fewer batches

Solvers (every one minimises the same float64 dual g(eta, lambda) over the same box):
- newton-warm: rllib_cvpo's projected damped Newton, warm-started from its solution on the previous batch (as in
  training, where consecutive minibatches have similar duals);
- newton-cold: the same from (eta, lambda) = (1, 0) every time;
- slsqp-orig: SciPy SLSQP with finite-difference gradients at the original code's settings (maxiter 10, tol and ftol
  1e-3), warm-started like the original code;
- slsqp-tight: the same with tol 1e-12 and maxiter 200 (what reaching the optimum costs SLSQP);
- cvxpy: the exponential-cone program (Clarabel), on the first few batches only (about a second per solve).

Batches: B states, N sampled actions; Q_r = v_s + z, Q_c,1 = c_s + 0.8 z + 0.6 w (reward and cost in tension), a
second constraint Q_c,2 = c'_s + 0.5 z + 0.8 w'; thresholds a little under the batch mean so the constraints are
active. "gap" is (g - g_best) / |g_best|, g_best the lowest value any solver reached on that batch.
"""

from __future__ import annotations

import os

# One BLAS thread, as in training: Ray sets OMP_NUM_THREADS to a worker's CPUs (1 for the learner of a 1-CPU trial),
# and OpenBLAS follows it. With spare threads on a busy machine, a 16k-element np.vdot can take milliseconds.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from scipy.optimize import minimize

from rllib_cvpo.cvpo import estep

EPS_KL = 0.1
BOUNDS = dict(eta_min=1e-6, eta_max=1e4, lam_max=1e3)


def make_batches(count: int, b: int, n: int, m: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        v = rng.normal(0, 5, (b, 1))
        z, w, w2 = rng.normal(size=(3, b, n))
        qr = v + z
        qc1 = rng.uniform(2, 8, (b, 1)) + 0.8 * z + 0.6 * w
        qcs = [qc1]
        if m == 2:
            qcs.append(rng.uniform(1, 4, (b, 1)) + 0.5 * z + 0.8 * w2)
        qc = np.stack(qcs, -1)
        thresholds = [float(qc[..., 0].mean() - 0.3)] + ([float(qc[..., 1].mean() - 0.2)] if m == 2 else [])
        batches.append((qr, qc, thresholds))
    return batches


def dual_numpy(theta, qr, qc, eps_c):
    """g(eta, lambda) in float64 numpy, as the original code evaluates it (stable log-mean-exp)."""
    eta, lam = theta[0], np.asarray(theta[1:])
    x = qr - (qc * lam).sum(-1)
    z = x / eta
    zmax = z.max(1, keepdims=True)
    lme = zmax[:, 0] + np.log(np.exp(z - zmax).mean(1))
    return float(eta * EPS_KL + lam @ eps_c + eta * lme.mean())


def solve_slsqp(qr, qc, eps_c, x0, tight: bool):
    m = qc.shape[-1]
    bounds = [(BOUNDS["eta_min"], BOUNDS["eta_max"])] + [(0.0, BOUNDS["lam_max"])] * m
    options = {"maxiter": 200, "ftol": 1e-12} if tight else {"maxiter": 10, "ftol": 1e-3}
    res = minimize(dual_numpy, np.asarray(x0, float), args=(qr, qc, np.asarray(eps_c)), method="SLSQP",
                   bounds=bounds, tol=1e-12 if tight else 1e-3, options=options)
    x = np.clip(res.x, [b[0] for b in bounds], [b[1] for b in bounds])
    return x, int(res.nit)


def run(n: int, m: int, count: int, cvxpy_count: int, b: int = 256):
    batches = make_batches(count, b, n, m, seed=n * 10 + m)
    solvers = ["newton-warm", "newton-cold", "slsqp-orig", "slsqp-tight", "cvxpy"]
    times = {s: [] for s in solvers}
    iters = {s: [] for s in solvers}
    thetas = {s: [] for s in solvers}
    warm = {"newton-warm": np.array([1.0] + [0.0] * m), "slsqp-orig": np.array([0.1] + [0.1] * m),
            "slsqp-tight": np.array([0.1] + [0.1] * m)}
    for k, (qr, qc, thr) in enumerate(batches):
        tqr, tqc = torch.from_numpy(qr), torch.from_numpy(qc)
        for name in ("newton-warm", "newton-cold"):
            start = warm["newton-warm"] if name == "newton-warm" else np.array([1.0] + [0.0] * m)
            t0 = time.perf_counter()
            sol = estep.solve_dual_newton(estep.DualProblem(tqr, tqc, EPS_KL, thr), float(start[0]), start[1:],
                                          **BOUNDS)
            times[name].append(time.perf_counter() - t0)
            iters[name].append(sol.iterations)
            theta = np.array([sol.eta, *sol.lam])
            thetas[name].append(theta)
            if name == "newton-warm":
                warm[name] = theta
        for name in ("slsqp-orig", "slsqp-tight"):
            t0 = time.perf_counter()
            theta, it = solve_slsqp(qr, qc, thr, warm[name], tight=name == "slsqp-tight")
            times[name].append(time.perf_counter() - t0)
            iters[name].append(it)
            thetas[name].append(theta)
            warm[name] = theta
        if k < cvxpy_count:
            t0 = time.perf_counter()
            sol = estep.solve_dual_cvxpy(estep.DualProblem(tqr, tqc, EPS_KL, thr), **BOUNDS)
            times["cvxpy"].append(time.perf_counter() - t0)
            iters["cvxpy"].append(0)
            thetas["cvxpy"].append(np.array([sol.eta, *sol.lam]))
    # Values, gaps and errors, every one evaluated by the same numpy dual.
    rows = {}
    for name in solvers:
        gaps, eta_err, lam_err = [], [], []
        for k, theta in enumerate(thetas[name]):
            qr, qc, thr = batches[k]
            values = {s: dual_numpy(thetas[s][k], qr, qc, np.asarray(thr)) for s in solvers if k < len(thetas[s])}
            best_s = min(values, key=values.get)
            best = thetas[best_s][k]
            g_best = values[best_s]
            gaps.append((values[name] - g_best) / abs(g_best))
            eta_err.append(abs(theta[0] - best[0]) / best[0])
            lam_err.append(float(np.max(np.abs(theta[1:] - best[1:]) / np.maximum(best[1:], 1e-9))))
        rows[name] = {
            "ms": 1e3 * statistics.median(times[name]), "iters": statistics.median(iters[name]) if iters[name] else 0,
            "gap_med": statistics.median(gaps), "gap_max": max(gaps), "eta_err": statistics.median(eta_err),
            "lam_err": statistics.median(lam_err), "solves": len(times[name]),
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    count, cvx = (12, 2) if args.quick else (40, 3)
    print(f"E-step dual solvers, B=256, eps={EPS_KL}; {platform.processor() or platform.machine()}, "
          f"torch and BLAS threads 1; median over {count} consecutive batches (cvxpy: first {cvx})")
    for m in (1, 2):
        for n in (16, 32, 64):
            rows = run(n, m, count, cvx)
            print(f"\nN={n}, constraints={m}")
            print(f"  {'solver':12s} {'ms/solve':>9s} {'iters':>6s} {'gap median':>11s} {'gap max':>9s} "
                  f"{'eta err':>9s} {'lam err':>9s}")
            for name, r in rows.items():
                print(f"  {name:12s} {r['ms']:9.2f} {r['iters']:6.0f} {r['gap_med']:11.1e} {r['gap_max']:9.1e} "
                      f"{r['eta_err']:9.1e} {r['lam_err']:9.1e}")
            w = rows["newton-warm"]["ms"]
            equal = rows["newton-warm"]["gap_max"] <= 1e-8 and rows["slsqp-tight"]["gap_max"] <= 1e-8
            print(f"  ratios: slsqp-tight / newton-warm = {rows['slsqp-tight']['ms'] / w:.1f}x "
                  f"(both at gap <= 1e-8: {'yes' if equal else 'NO'}), cvxpy / newton-warm = "
                  f"{rows['cvxpy']['ms'] / w:.0f}x, slsqp-orig / newton-warm = {rows['slsqp-orig']['ms'] / w:.1f}x "
                  f"(slsqp-orig leaves a median gap of {rows['slsqp-orig']['gap_med']:.1e}, eta off by "
                  f"{rows['slsqp-orig']['eta_err']:.0%})")


if __name__ == "__main__":
    main()
