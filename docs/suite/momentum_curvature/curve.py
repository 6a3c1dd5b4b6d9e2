import sys, json, numpy as np
from examples import suite_runs
w = sys.argv[1]; steps = int(sys.argv[2])
r = suite_runs.run(w, "tkfac_adaptive", steps=steps, eval_every=10)
s = np.array(r["step_seconds"])
h = r["step_hyperparameters"] if "step_hyperparameters" in r else {}
mu = h.get("momentum", [])
print("RESULT", json.dumps({"w": w, "first": round(s[0],2), "median": round(float(np.median(s[1:])),4),
  "curve": [(c[0], round(c[2],4)) for c in r["curve"]][1:], "mu_med": round(float(np.median(mu)),3) if mu else None,
  "alpha_med": round(float(np.median(h.get("learning_rate",[0]))),4), "lam_last": h.get("damping",[None])[-1]}))
