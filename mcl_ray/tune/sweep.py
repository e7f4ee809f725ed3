"""Hyperparameter sweeps: Ray Tune + OptunaSearch (TPE) + ASHA over epochs, a TorchTrainer per trial.

Layout under <run_dir>/tune/:
    ray/<name>/            Tune's experiment state (what `Tuner.restore` resumes from)
    trials/<trial_id>/     each trial's training folder (params.json, config.json, history.json,
                           model.safetensors of its best epoch, checkpoint/ for resumption)
    trials.json            one row per trial; report.md + PNG plots (mcl_ray.tune.report)
    winner.json            the winning trial (params, validation AUC) and its test metrics
    fingerprint.json       the stage marker: a finished sweep with the same inputs is reused
The winner is evaluated on the test split once and exported to <run_dir>/artifact.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.tune

from mcl_ray.artifact import export_artifact
from mcl_ray.core.config import ExperimentConfig
from mcl_ray.core.errors import RunError
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.core.stage import Marker, Stage, fingerprint
from mcl_ray.evaluate.evaluate import evaluate_train_dir
from mcl_ray.evaluate.evaluate import fairness_groups
from mcl_ray.train.trainer import (build_trainer, check_ready, data_mode, holdout_ids, materialized_splits,
                                   resume_epoch)
from mcl_ray.tune.report import write_report
from mcl_ray.tune.space import decode_value, default_point, search_space, trial_config

METRIC = "best_val_auc"  # monotone in epochs: ASHA and Optuna compare each trial's best so far


class SweepError(RunError):
    """A sweep that produced no usable trial."""


@dataclass
class SweepResult:
    tune_dir: Path
    trials: list[dict]
    winner: dict
    artifact: Path
    test_metrics: dict
    seconds: float


# ----------------------------------------------------------------------------- one trial


def run_trial(params: dict, base: dict, prepare_dir: str, trials_dir: str, datasets: dict) -> None:
    """Tune function trainable: builds and fits one TorchTrainer; epochs reach Tune through
    TuneReportCallback. A trial restarted after an interruption resumes from its checkpoint."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(base, params)
    out_dir = Path(trials_dir) / trial_id
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps({k: decode_value(v) for k, v in params.items()}, indent=1))
    (out_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    start_epoch = resume_epoch(out_dir)
    with open(out_dir / "starts.log", "a") as f:  # one line per (re)start: resumption is visible
        f.write(f"{time.time():.0f} epoch {start_epoch}\n")
    spec = FeatureSpec.load(prepare_dir)
    trainer = build_trainer(cfg, spec, Path(prepare_dir), out_dir, cfg.train.seed, start_epoch,
                            run_name=f"trial-{trial_id}", callbacks=[TuneReportCallback()], datasets=datasets)
    trainer.fit()


# ----------------------------------------------------------------------------- the sweep


def concurrency(cfg: ExperimentConfig) -> int:
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    per_trial = max(cfg.train.num_workers, 1) * cfg.train.cpus_per_worker
    return max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))


def make_tuner(cfg: ExperimentConfig, prepare_dir: Path, tune_dir: Path, watcher: TrialsWatcher | None = None):
    """-> (Tuner, resumed): a new sweep, or the interrupted one in tune_dir restored."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    tc = cfg.tune
    epochs = tc.epochs or cfg.train.epochs
    base = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})}).model_dump(mode="json")
    spec = FeatureSpec.load(prepare_dir)
    trainable = ray.tune.with_parameters(run_trial, base=base, prepare_dir=str(prepare_dir.resolve()),
                                         trials_dir=str((tune_dir / "trials").resolve()),
                                         datasets=materialized_splits(
                                             spec, prepare_dir, cfg.train.sample_rows, cfg.train.seed,
                                             synthetic=cfg.augment.enabled, stream=data_mode(cfg, spec) == "stream",
                                             holdout=holdout_ids(cfg, spec)))
    # The trial function only drives its TorchTrainer: the workers hold the CPUs. Any CPU share
    # here would leave N trials x (workers + share) > CPUs and deadlock the last worker, so the
    # request is a token amount of memory (Tune refuses an empty one).
    trainable = ray.tune.with_resources(trainable, {"cpu": 0, "memory": 1 << 20})
    storage_root = (tune_dir / "ray").resolve()
    exp_path = storage_root / cfg.name
    callbacks = [watcher] if watcher is not None else None
    if ray.tune.Tuner.can_restore(str(exp_path)):
        tuner = ray.tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True,
                                       restart_errored=False)
        # the saved run config holds a watcher without its bar (not picklable): give it this one
        tuner._local_tuner.get_run_config().callbacks = callbacks
        return tuner, True
    point = default_point(cfg)
    points = [point] if tc.include_default and point else None
    storage = optuna.storages.RDBStorage(tc.storage) if tc.storage else None
    searcher = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=tc.seed), seed=tc.seed,
                            points_to_evaluate=points, storage=storage,
                            study_name=cfg.name if storage else None)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=min(tc.grace_period, epochs),
                               reduction_factor=tc.reduction_factor)
                 if tc.scheduler == "asha" else FIFOScheduler())
    tuner = ray.tune.Tuner(
        trainable,
        param_space=search_space(tc),
        tune_config=ray.tune.TuneConfig(metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler,
                                        num_samples=tc.num_samples, max_concurrent_trials=concurrency(cfg),
                                        time_budget_s=tc.time_budget_s, trial_dirname_creator=_trial_dirname),
        run_config=ray.tune.RunConfig(name=cfg.name, storage_path=str(storage_root),
                                      failure_config=ray.tune.FailureConfig(max_failures=0), callbacks=callbacks,
                                      verbose=0),  # our own line per finished trial (TrialsWatcher)
    )
    return tuner, False


def _trial_dirname(trial) -> str:
    return trial.trial_id  # Tune's folder and ours share the name


def trial_rows(result_grid, tune_dir: Path, max_epochs: int) -> list[dict]:
    rows = []
    for r in result_grid:
        m = r.metrics or {}
        trial_id = Path(r.path).name
        folder = tune_dir / "trials" / trial_id
        hist = json.loads((folder / "history.json").read_text()) if (folder / "history.json").exists() else []
        params = json.loads((folder / "params.json").read_text()) if (folder / "params.json").exists() else {}
        epochs = len(hist)
        rows.append({
            "trial_id": trial_id, "params": params, "epochs": epochs,
            "best_val_auc": max((h["val_auc"] for h in hist), default=float("nan")),
            "val_auc_curve": [h["val_auc"] for h in hist],
            # Tune's view decides the status; the history on disk may hold one more epoch that
            # finished while the stop was on its way (the exported weights match the history).
            "status": "error" if r.error else ("early-stopped" if m.get("training_iteration", 0) < max_epochs
                                               and hist and not _patience_stop(hist, folder) else "done"),
            "error": f"{type(r.error).__name__}: {str(r.error).splitlines()[0][:300]}" if r.error else None,
            "seconds": sum(h.get("epoch_seconds", 0) for h in hist),
            "started": _first_start(folder),
            "folder": str(folder),
        })
    rows.sort(key=lambda x: x["started"])
    for i, r in enumerate(rows):
        r["order"] = i
    return rows


def _patience_stop(hist: list[dict], folder: Path) -> bool:
    """True when the trial ended on its own early stopping (train.patience), not ASHA's."""
    cfg = json.loads((folder / "config.json").read_text())
    best = max(range(len(hist)), key=lambda i: hist[i]["val_auc"])
    return len(hist) - 1 - best >= cfg["train"]["patience"]


def _first_start(folder: Path) -> float:
    f = folder / "starts.log"
    words = f.read_text().split() if f.exists() else []
    return float(words[0]) if words else math.inf


def sweep_fingerprint(cfg: ExperimentConfig, spec: FeatureSpec) -> str:
    """Same fingerprint: the sweep in the run directory is this one (resume or reuse it)."""
    blob = {k: getattr(cfg, k).model_dump(mode="json") for k in ("model", "train", "tune")}
    blob["tune"].pop("enabled")
    blob["data"] = spec.data_fingerprint
    if cfg.augment.enabled:  # other synthetic rows or weight: another sweep
        blob["augment"] = {"weight": cfg.augment.weight, "rows": spec.synthetic.fingerprint if spec.synthetic else None}
    return fingerprint(blob)


class TrialsWatcher(ray.tune.Callback):
    """Runs in the driver: one line per finished trial and the stage's progress bar."""

    def __init__(self, bar):
        self.bar = bar

    def __getstate__(self) -> dict:  # Tune saves its run config; a console and its lock do not pickle
        return {"bar": None}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "error")

    def _line(self, trial, status: str) -> None:
        if self.bar is None:
            return
        auc = (trial.last_result or {}).get(METRIC)
        self.bar.print(f"  trial {trial.trial_id} {status}: {trial.last_result.get('training_iteration', 0)} epoch(s)"
                       + (f", best val AUC {auc:.4f}" if auc is not None else ""))
        self.bar.update(advance=1)


class TuneStage(Stage[SweepResult]):
    """A sweep in <run_dir>/tune: resumed when interrupted (same fingerprint), reused when finished,
    started over when the config or data changed."""

    name = "tune"

    def __init__(self, cfg: ExperimentConfig, prepare_dir: Path, run_dir: Path, force: bool = False,
                 quiet: bool = False):
        super().__init__(cfg, force, quiet)
        self.prepare_dir, self.run_dir = Path(prepare_dir), Path(run_dir)
        self.tune_dir = self.run_dir / "tune"
        self.spec = FeatureSpec.load(prepare_dir)
        # augment.weight may be searched: synthetic rows are needed whenever augment is enabled
        check_ready(cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"weight": 1.0})}), self.spec)
        fairness_groups(cfg, self.spec, self.prepare_dir)  # the winner's evaluation needs them: fail now

    @property
    def marker(self) -> Marker:
        return Marker(self.tune_dir / "fingerprint.json")

    def marker_extra(self) -> dict:
        return {"complete": True}

    def data_fingerprint(self) -> str:
        return self.spec.data_fingerprint

    def fingerprint(self) -> str:
        return sweep_fingerprint(self.cfg, self.spec)

    def load_cached(self) -> SweepResult:
        rows = json.loads((self.tune_dir / "trials.json").read_text())
        winner = json.loads((self.tune_dir / "winner.json").read_text())
        # the artifact may have been replaced since (a train run, an export): the winner's again,
        # free when it is still there (the export stage's own marker)
        artifact = export_artifact(Path(winner["folder"]), self.prepare_dir, self.run_dir / "artifact",
                                   source={"kind": "tune", "trial_id": winner["trial_id"], "params": winner["params"]},
                                   quiet=self.quiet)
        return SweepResult(self.tune_dir, rows, winner, artifact, winner["test"], 0.0)

    def compute(self, fp: str) -> SweepResult:
        cfg, tune_dir = self.cfg, self.tune_dir
        if tune_dir.exists() and (self.force or (self.marker.read() or {}).get("fingerprint") != fp):
            self.say(f"[yellow]tune: {'--force' if self.force else 'config or data changed'}; starting a new sweep "
                     f"in {tune_dir}")
            shutil.rmtree(tune_dir)
        (tune_dir / "trials").mkdir(parents=True, exist_ok=True)
        self.marker.write(fp, complete=False)  # same fingerprint next time: resume
        (tune_dir / "sweep_config.json").write_text(cfg.model_dump_json(indent=2))
        epochs = cfg.tune.epochs or cfg.train.epochs
        resuming = ray.tune.Tuner.can_restore(str((tune_dir / "ray" / cfg.name).resolve()))
        # a resumed sweep's bar counts the trials finished from here on (no total: some finished before)
        with self.progress("trials finished", None if resuming else cfg.tune.num_samples, "trials") as bar:
            tuner, resumed = make_tuner(cfg, self.prepare_dir, tune_dir, TrialsWatcher(bar))
            if resumed:
                self.say(f"[yellow]tune: resuming the sweep in {tune_dir / 'ray'} (finished trials are kept)")
            self.say(f"[bold cyan]tune[/] {cfg.tune.num_samples} trials x up to {epochs} epochs, "
                     f"{cfg.tune.scheduler.upper()}, {concurrency(cfg)} at a time, searching {', '.join(cfg.tune.space)}")
            t_fit = time.perf_counter()
            try:
                grid = tuner.fit()
            finally:  # wall time across interruptions and resumptions, for trials per hour
                timing = tune_dir / "timing.json"
                spent = json.loads(timing.read_text())["fit_seconds"] if timing.exists() else 0.0
                timing.write_text(json.dumps({"fit_seconds": spent + time.perf_counter() - t_fit}))
        # Tune turns Ctrl+C / SIGTERM into an orderly stop that saves the experiment and returns the
        # partial results; a short sweep that was not cut by its time budget was interrupted.
        budget_hit = cfg.tune.time_budget_s and time.perf_counter() - t_fit >= cfg.tune.time_budget_s
        unfinished = [r for r in grid if not r.error and not (r.metrics or {}).get("done", False)]
        if (len(grid) < cfg.tune.num_samples or unfinished) and not budget_hit:
            raise KeyboardInterrupt(f"sweep interrupted after {len(grid) - len(unfinished)} finished trial(s)")
        return self._finish(grid, epochs)

    def _finish(self, grid, epochs: int) -> SweepResult:
        """Trials table, the winner on validation, its one test evaluation, export and report."""
        cfg, tune_dir = self.cfg, self.tune_dir
        rows = trial_rows(grid, tune_dir, epochs)
        (tune_dir / "trials.json").write_text(json.dumps(rows, indent=1))
        ok = [r for r in rows if r["status"] != "error" and r["epochs"] > 0]
        for r in rows:
            if r["status"] == "error":
                self.say(f"[red]  trial {r['trial_id']} failed: {r['error']}")
        if not ok:
            raise SweepError(f"all {len(rows)} trials failed; see {tune_dir / 'trials.json'} and {tune_dir / 'ray'}")
        winner = max(ok, key=lambda r: r["best_val_auc"])
        winner_dir = Path(winner["folder"])
        self.say(f"[green]tune: winner {winner['trial_id']} val AUC {winner['best_val_auc']:.4f} "
                 f"with {winner['params']}; evaluating it on the test split")
        test = evaluate_train_dir(winner_dir, self.prepare_dir, "test")  # the only test evaluation of the sweep
        (tune_dir / "winner.json").write_text(json.dumps({**winner, "test": test}, indent=1))
        artifact = export_artifact(winner_dir, self.prepare_dir, self.run_dir / "artifact", force=True,
                                   source={"kind": "tune", "trial_id": winner["trial_id"], "params": winner["params"]},
                                   quiet=self.quiet)
        point = {k: decode_value(v) for k, v in default_point(cfg).items()}
        default = next((r for r in rows if cfg.tune.include_default and point and r["params"] == point), None)
        fit_s = json.loads((tune_dir / "timing.json").read_text())["fit_seconds"]
        write_report(tune_dir, cfg, rows, winner, test, default, fit_s)
        return SweepResult(tune_dir, rows, winner, artifact, test, time.perf_counter() - self.t0)


def sweep(cfg: ExperimentConfig, prepare_dir: Path, run_dir: Path, force: bool = False,
          quiet: bool = False) -> SweepResult:
    return TuneStage(cfg, prepare_dir, run_dir, force, quiet).run()
