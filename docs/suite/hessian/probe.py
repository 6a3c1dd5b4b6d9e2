"""Probe (not part of the library): the adaptive step's curvature along d.

    python docs/suite/hessian/probe.py fd WORKLOAD STEPS
        prints, every step, dᵀGd (the Gauss–Newton curvature the step uses)
        and the loss's own second difference along d on the same examples,
        (h(θ + εd) − 2h(θ) + h(θ − εd)) / ε², for ε = 0.05 and 0.2 / √(dᵀGd);
    python docs/suite/hessian/probe.py hessian WORKLOAD STEPS
        also takes the step with the full Hessian H in the quadratic model
        (H v by a forward-mode walk of the curvature batch's gradient graph),
        where H's 2×2 model is positive definite, else G's.

Runs from the repository root, seed 0, library defaults otherwise.
"""
import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.getcwd())
from examples import suite_runs  # noqa: E402
from tkfac_tf import curvature, forward_mode  # noqa: E402

MODE, WORKLOAD, STEPS = sys.argv[1], sys.argv[2], int(sys.argv[3])
gauss_newton_gram = curvature.gauss_newton_gram


def second_differences(probe, values, direction, loss, curvature_along):
    out = []
    for scale in (0.05, 0.2):
        eps = scale / tf.sqrt(tf.abs(curvature_along))
        plus = probe.loss([v + eps * x for v, x in zip(values, direction)])
        minus = probe.loss([v - eps * x for v, x in zip(values, direction)])
        out.append((plus - 2.0 * loss + minus) / eps ** 2)
    return out


def gram_with_probe(probe, values, vectors):
    if MODE == "fd":
        loss, gram = gauss_newton_gram(probe, values, vectors)
        tf.print("G", gram[0, 0], "FD", *second_differences(probe, values, vectors[0], loss, gram[0, 0]))
        return loss, gram
    values = [tf.identity(v) for v in values]
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(values)
        loss, outputs = probe._evaluate(values, tape)
    grads = tape.gradient(loss, list(outputs) + values, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    n = len(outputs)
    walked = forward_mode.jvp(values, vectors, list(outputs) + list(grads))
    gn = curvature.symmetric_gram(2, lambda i, j: curvature.dot(walked[i][:n], walked[j][n:2 * n]))
    hessian = curvature.symmetric_gram(2, lambda i, j: curvature.dot(vectors[i], walked[j][2 * n:]))
    det = hessian[0, 0] * hessian[1, 1] - hessian[0, 1] ** 2
    definite = (hessian[0, 0] > 0) & ((hessian[1, 1] == 0) | (det > 0))
    tf.print("G", gn[0, 0], "H", hessian[0, 0], "FD",
             *second_differences(probe, values, vectors[0], loss, gn[0, 0]))
    return loss, tf.where(definite, hessian, gn)


curvature.gauss_newton_gram = gram_with_probe
run = suite_runs.run(WORKLOAD, "tkfac_adaptive", steps=STEPS, seed=0)
print("held-out", [(step, round(loss, 4)) for step, _, loss in run["curve"]])
print("first step s", round(run["step_seconds"][0], 1), "median step s", round(float(np.median(run["step_seconds"][1:])), 3))
