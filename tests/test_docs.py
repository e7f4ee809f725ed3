"""The README's measured figures come from bench/results (scripts/readme_figures.py): a README
edited by hand, or results changed without regenerating it, fails here."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_figures_match_bench_results():
    p = subprocess.run([sys.executable, "scripts/readme_figures.py", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-1000:]
    assert "blocks)" in p.stdout


def test_a_stale_figure_is_caught(tmp_path):
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- figures:tune -->\n") + len("<!-- figures:tune -->\n")
    stale = tmp_path / "README.md"
    stale.write_text(readme[:start] + "ASHA 1.0 min, typed by hand.\n" + readme[readme.index("<!-- /figures:tune -->"):])
    p = subprocess.run([sys.executable, "scripts/readme_figures.py", "--check", "--readme", str(stale)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "out of date" in p.stderr and "typed by hand" in p.stdout
