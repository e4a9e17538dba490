"""Merge the per-seed LM study runs of the 1-bit Adam measurement into one table (the study's own summarize)."""
import glob
import json

from ddp_qhooks.tools import study

runs = []
for path in sorted(glob.glob("results/onebit_lm_*/study.json")):
    if "refresh_s0" in path:  # an earlier refresh rule, reported separately
        continue
    runs += json.load(open(path))["runs"]
rows = study.summarize(runs, None, 3e-3)
print(study.format_table(rows))
for line in study.check_lm_targets(rows):
    print("*", line)
by = {}
for r in runs:
    if "error" not in r and r["final_val_loss"] == r["final_val_loss"]:  # diverged (NaN) runs left out
        by.setdefault(r["config"], {})[r["seed"]] = r["final_val_loss"]
print()
for c, s in by.items():
    print(c, {k: round(v, 4) for k, v in sorted(s.items())})
print()
print("| config | seeds | val loss (mean ± std) | ratio to fp32, per seed (mean ± std) | x fewer bytes |")
print("|---|---|---|---|---|")
import statistics  # noqa: E402
fewer = {r["config"]: r.get("fewer_bytes") for r in rows}
for c, s in by.items():
    ratios = [v / by["fp32"][k] for k, v in s.items() if k in by.get("fp32", {})]
    if not ratios:
        continue
    sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
    lsd = statistics.stdev(s.values()) if len(s) > 1 else 0.0
    fb = fewer.get(c)
    print(f"| {c} | {len(ratios)} | {statistics.fmean(s.values()):.4f} ± {lsd:.4f} | "
          f"{statistics.fmean(ratios):.4f} ± {sd:.4f} | {'–' if fb is None else f'{fb:.1f}'} |")
