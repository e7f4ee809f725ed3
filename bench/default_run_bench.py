"""The README's first command, measured: `mcl-ray run experiments/ml1m_swr.yaml` from scratch
(--force, serve demo included), its wall time and its console, as a person sees them.

  python bench/default_run_bench.py [--run-dir runs/bench_default] [--out bench/results/default_run.json]

The README's expected output and timing are generated from the result by
`python scripts/readme_figures.py` (and checked against it by the test suite), so they cannot
drift from what the command prints. Set-up time is not included (see the README)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="experiments/ml1m_swr.yaml")
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_default"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/default_run.json"))
    a = ap.parse_args()
    exe = str(Path(sys.executable).parent / "mcl-ray")
    cmd = [exe, "run", a.config, "--force", "--set", f"run_dir={a.run_dir}"]
    env = dict(os.environ, COLUMNS="100", TERM="dumb")  # a log's width, no colours
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"the default run failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    summary = json.loads((Path(a.run_dir) / "train" / "summary.json").read_text())
    # stdout (results) and stderr (progress) interleave on a terminal; keep each stream's order
    out = {
        "command": f"mcl-ray run {a.config}",
        "run_dir": str(Path(a.run_dir).resolve()),  # the README shows runs/<name>, the default run_dir
        "wall_seconds": round(wall, 1),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "test_auc": summary["overall"]["auc"]["mean"],
        "test_auc_by_scenario": {k: v["auc"]["mean"] for k, v in summary["by_scenario"].items()},
        "backbone": summary["backbone"],
        "fairness": summary.get("fairness"),  # by user group and item popularity, test split
        "stderr": ANSI.sub("", p.stderr).splitlines(),
        "stdout": ANSI.sub("", p.stdout).splitlines(),
    }
    Path(a.out).write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(f"default run: {wall / 60:.1f} min, test AUC {out['test_auc']:.4f} -> {a.out}")


if __name__ == "__main__":
    main()
