"""Pool the per-seed study.json files of results/federated/ into one table (mean +- std over seeds)."""
import glob
import json
import statistics
import sys

rows = {}
for path in sys.argv[1:]:
    for run in json.load(open(path))["runs"]:
        rows.setdefault(run["config"], []).append(run)
fp32 = statistics.fmean(100 * r["final_accuracy"] for r in rows["fp32"]) if "fp32" in rows else None
print("| config | seeds | test acc % | vs fp32 (pt) | MB sent/rank | x fewer bytes than fp32 DDP |")
print("|---|---|---|---|---|---|")
for cfg, runs in rows.items():
    ok = [r for r in runs if "error" not in r and not r["diverged"]]
    accs = [100 * r["final_accuracy"] for r in ok]
    acc = f"{statistics.fmean(accs):.2f} ± {statistics.stdev(accs) if len(accs) > 1 else 0:.2f}" if accs else "–"
    vs = f"{statistics.fmean(accs) - fp32:+.2f}" if accs and fp32 is not None else "–"
    mb = f"{statistics.fmean(r['bytes_sent'] for r in ok) / 1e6:.2f}" if ok else "–"
    fewer = f"{statistics.fmean(r['fp32_bytes_sent'] / r['bytes_sent'] for r in ok):.1f}" if ok else "–"
    print(f"| {cfg} | {len(ok)}/{len(runs)} | {acc} | {vs} | {mb} | {fewer} |")
