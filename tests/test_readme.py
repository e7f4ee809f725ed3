"""The README's commands work as written: its `doc-test: run` blocks run here, in order, from a
copy of the repository (only the ports change), and its `doc-test: check` blocks are checked for
syntax (the program exists, its flags are accepted, its configs and manifests parse)."""

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import json
import pytest
import yaml

from mcl_ray.core.ray_env import free_port
from readme_blocks import ROOT, blocks, check_command, commands, with_ports

README = (ROOT / "README.md").read_text()


def test_every_shell_block_is_marked_run_or_check_with_a_reason():
    found = blocks(README)
    assert len([b for b in found if b.mode == "run"]) >= 5
    for b in found:
        assert b.mode in {"run", "check"}, f"{b}: mark it <!-- doc-test: run --> or <!-- doc-test: check. why -->"
        assert b.mode == "run" or len(b.why) > 20, f"{b}: say why it cannot run here"


@pytest.mark.parametrize("block", [b for b in blocks(README) if b.mode == "check"], ids=str)
def test_check_blocks_name_real_commands_flags_and_files(block):
    for words in commands(block.code):
        check_command(words, str(block))


@pytest.mark.parametrize("broken, message", [
    (".venv/bin/mcl-ray run experiments/ml1m_swr.yaml --no-serve-dem", "No such option"),
    (".venv/bin/mcl-ray run experiments/ml1m_swr.yaml --set model.backbone=nope", "model.backbone"),
    (".venv/bin/mcl-ray trian experiments/ml1m_swr.yaml", "no such command"),
    ("ray job submit --adress http://127.0.0.1:8265 -- python -m mcl_ray run experiments/ml1m_swr.yaml", "--adress"),
    ("ray job submit -- python -m mcl_ray run experiments/missing.yaml", "missing.yaml"),
    ("bash scripts/setup.sh vllm", "no mode 'vllm'"),
    (".venv/bin/python bench/accuracy_bench.py --trials 3", "does not accept"),
])
def test_a_broken_command_fails_the_check(broken, message):
    with pytest.raises(Exception) as e:
        for words in commands(broken):
            check_command(words, "README.md")
    assert message in str(e.value)


def _repo_copy(dest: Path) -> Path:
    """The files a fresh clone has (tracked and new, not ignored), plus this checkout's .venv."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


@pytest.mark.ray
def test_run_blocks_work_as_written(tmp_path):
    repo = _repo_copy(tmp_path / "repo")
    temp = Path(tempfile.mkdtemp(prefix="mcld-"))  # short: Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "VIRTUAL_ENV"}}
    # No activated venv: the README's commands name .venv/bin themselves.
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if Path(p).resolve() != (ROOT / ".venv/bin").resolve())
    env.update(RAY_TMPDIR=str(temp), MCL_RAY_STAGING=str(tmp_path / "staging"))
    ports = {8265: free_port(), 8000: free_port()}
    head = [f"--port={free_port()}", f"--dashboard-port={ports[8265]}", "--num-cpus=2"] + [
        f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                              "metrics-export-port", "runtime-env-agent-port",
                                              "ray-client-server-port", "node-manager-port", "object-manager-port")]
    outputs = []
    try:
        for block in [b for b in blocks(README) if b.mode == "run"]:
            script = with_ports(block.code, ports, head)
            t0 = time.time()
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=repo, env=env, capture_output=True,
                               text=True, timeout=600)
            log = r.stdout + r.stderr
            print(f"{block}: exit {r.returncode} in {time.time() - t0:.0f} s")
            assert r.returncode == 0, f"{block} failed (exit {r.returncode}):\n{script}\n---\n{log[-5000:]}"
            outputs.append(log)
    finally:
        subprocess.run(["pkill", "-f", f"--dashboard-port={ports[8265]}"], check=False)  # a head a failed block left
        shutil.rmtree(temp, ignore_errors=True)
    quick, config, tune_augment, serve, cluster, shop = outputs
    run = repo / "runs/ml1m_swr_quick"
    assert "POST /v1/recommend user" in quick and "inputs and config unchanged" in quick
    assert "interactions: in 50,000 = kept 50,000 + quarantined 0" in quick
    # what a person reads: each epoch line once, stage lines, no Ray-internal chatter (it is in ray.log)
    for epoch in (1, 2, 3):  # the quick experiment's 3 epochs (the second run reuses them)
        assert quick.count(f"  epoch {epoch}: loss ") == 1, quick[-3000:]
    for noise in ("core_worker.cc", "(raylet)", "(pid=", "(RayTrainWorker", "INFO ", "Progress bars",
                  "available CPUs", "worker processes have been started", "Started a local Ray", "[36m"):
        assert noise not in quick, (noise, quick[-3000:])
    assert "Ray's logs: " in quick and (run / "ray.log").exists()
    report = (run / "report.md").read_text()
    for section in ("## Data (prepare)", "## Text features (encode)", "## Training", "## Model artifact",
                    "learning_curves.png", "### Fairness by user group (test)", "| gender | gap |"):
        assert section in report, section
    card = (run / "artifact/MODEL_CARD.md").read_text()  # the model card carries the fairness tables too
    assert "## Fairness by user group (test)" in card and "| head |" in card
    assert "ok: experiments/ml1m_swr.yaml" in config and "train.patience" in config
    assert yaml.safe_load((repo / "runs/my_experiment.yaml").read_text())["train"]["epochs"] == 5
    assert json.loads((run / "tune/summary.json").read_text())
    assert json.loads((run / "prepare/augment/stats.json").read_text())["requested"] == 4
    assert '"status":"ok"' in serve.replace(" ", "") and '"items":[' in serve.replace(" ", "")
    assert "Toy Story (1995)" in serve and "stopped" in serve
    assert '"fields":[{"field":' in serve.replace(" ", "") and '"convergence_delta":' in serve  # /v1/explain
    assert "succeeded" in cluster and "RUNNING" in cluster
    assert "clicked" in shop and '"items":[' in shop.replace(" ", "")  # your own data, served with context
    assert (repo / "runs/shop_tables/artifact/model.safetensors").exists()
    meta = json.loads((run / "metadata.json").read_text())["runs"]
    assert [m["stage"] for m in meta][:4] == ["prepare", "encode", "train", "export"]  # the first run
    assert any((m.get("ray_submission_id") or "").startswith("raysubmit_") for m in meta)  # the job's own entries


def test_cli_synopsis_names_real_commands_and_flags():
    """The README's `## The CLI` table: every subcommand and every --flag it shows exist."""
    import typer.main

    from mcl_ray.cli import app

    text = README[README.index("## The CLI"):]
    start = text.index("```\n") + 4
    synopsis = text[start:text.index("\n```", start)]
    root = typer.main.get_command(app)
    lines = [ln for ln in synopsis.splitlines() if ln.startswith("mcl-ray ")]
    assert len(lines) >= 12
    for ln in lines:
        words = ln.split("  ")[0].split()[1:]  # the usage part, before the description
        cmd, i = root, 0
        while hasattr(cmd, "commands"):
            cmd = cmd.get_command(None, words[i])
            assert cmd is not None, f"README CLI table: `{ln.strip()}`: no command {words[i]!r}"
            i += 1
        opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for flag in re.findall(r"--[a-z][\w-]*", " ".join(words[i:])):
            assert flag in opts, f"README CLI table: `mcl-ray {' '.join(words[:i])}` has no {flag}"
