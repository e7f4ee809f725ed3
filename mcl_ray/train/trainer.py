"""Driver side of training: build the TorchTrainer, run it per seed, evaluate, summarise."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from mcl_ray.core.config import ExperimentConfig
from mcl_ray.core.errors import SetupError
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.core.ray_env import dataset_in_blocks
from mcl_ray.core.stage import Marker, Stage, fingerprint
from mcl_ray.data.splits import model_columns, read_split
from mcl_ray.evaluate.evaluate import evaluate_train_dir, fairness_groups
from mcl_ray.models.text import check_text_inputs
from mcl_ray.train import checkpoint as ck
from mcl_ray.train.loop import LoopArgs, train_loop_per_worker


@dataclass
class TrainResult:
    train_dir: Path
    metrics: dict  # test metrics
    history: list[dict]
    cached: bool
    seconds: float


def train_fingerprint(cfg: ExperimentConfig, spec: FeatureSpec, seed: int, prepare_dir: Path | None = None) -> str:
    # a model without history fields fingerprints as before the history option existed (runs stay reusable)
    h = cfg.model.history
    unset = {k for k, v in (("raters", h.raters), ("encoder_layers", h.encoder_layers),
                            ("rater_table", h.rater_table != "shared")) if not v}  # options added later
    model = cfg.model.model_dump(mode="json", exclude={"history"} if not (h.pooling or h.raters) else
                                 {"history": unset} if unset else None)
    later = {k for k, v in (("soft_label", cfg.train.soft_label), ("ordinal_cuts", cfg.train.ordinal_cuts),
                            ("ordinal_weight", cfg.train.ordinal_cuts)) if not v}  # options added later
    train = cfg.train.model_dump(mode="json", exclude=later)
    blob = {"model": model, "train": train, "seed": seed, "data": spec.data_fingerprint}
    if uses_synthetic(cfg):  # other synthetic rows or weight: another run
        blob["augment"] = {"weight": cfg.augment.weight, "rows": spec.synthetic.fingerprint if spec.synthetic else None}
        if cfg.augment.denoise_share:  # only when set: earlier runs keep their fingerprint
            blob["augment"]["denoise_share"] = cfg.augment.denoise_share
    if cfg.model.text.mode == "frozen" and prepare_dir is not None:  # other embeddings: another run
        # the encoder's fingerprint (texts are covered by the data fingerprint), not the encode run's stats
        blob["embeddings"] = {f: json.loads((prepare_dir / spec.text[f].embedding).with_suffix(".json").read_text())
                              ["fingerprint"] for f in cfg.model.text.fields if f in spec.text and spec.text[f].embedding}
    # Scale-out settings do not change what is learned enough to invalidate a run, and a larger
    # `epochs` continues a run from its last checkpoint instead of starting over.
    for k in ("num_workers", "use_gpu", "cpus_per_worker", "max_failures", "eval_batch_size", "epochs"):
        blob["train"].pop(k)
    return fingerprint(blob)


def uses_synthetic(cfg: ExperimentConfig) -> bool:
    return cfg.augment.enabled and cfg.augment.weight > 0


def check_tracking(cfg: ExperimentConfig) -> None:
    if cfg.tracking.mlflow_uri:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise SetupError("tracking.mlflow_uri is set but MLflow is not installed: "
                             "pip install 'mcl-ray[tracking]' (mlflow-skinny), or set tracking.mlflow_uri=null") from None


class TrainSeed(Stage[TrainResult]):
    """One seed's training run in `train_dir`: Ray Train DDP, then (optionally) test evaluation.

    The marker holds the fingerprint and the epoch cap: same fingerprint and cap with `complete`
    reuses the run; same fingerprint otherwise resumes from its checkpoint (a larger cap continues
    it); another fingerprint starts over."""

    name = "train"

    def __init__(self, cfg: ExperimentConfig, prepare_dir: Path, train_dir: Path, seed: int, force: bool = False,
                 evaluate: bool = True, quiet: bool = False):
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
        super().__init__(cfg, force, quiet)
        self.prepare_dir, self.train_dir, self.seed, self.evaluate = Path(prepare_dir), Path(train_dir), seed, evaluate
        self.spec = FeatureSpec.load(prepare_dir)
        check_ready(cfg, self.spec)
        if evaluate:
            fairness_groups(cfg, self.spec, self.prepare_dir)  # a misnamed group fails now, not after training

    @property
    def marker(self) -> Marker:
        return Marker(self.train_dir / "fingerprint.json")

    def marker_extra(self) -> dict:
        return {"epochs": self.cfg.train.epochs, "complete": True, "evaluated": self.evaluate}

    def is_cached(self, fp: str) -> bool:  # a run evaluated on test also serves a request without evaluation
        m = self.marker.read() or {}
        return (not self.force and m.get("fingerprint") == fp and m.get("epochs") == self.cfg.train.epochs
                and m.get("complete", False) and (m.get("evaluated", False) or not self.evaluate))

    def data_fingerprint(self) -> str:
        return self.spec.data_fingerprint

    def fingerprint(self) -> str:
        return train_fingerprint(self.cfg, self.spec, self.seed, self.prepare_dir)

    def load_cached(self) -> TrainResult:
        d = self.train_dir
        metrics = json.loads((d / "metrics.json").read_text()) if self.evaluate else {}
        return TrainResult(d, metrics, json.loads((d / "history.json").read_text()), True, 0.0)

    def compute(self, fp: str) -> TrainResult:
        d, tc = self.train_dir, self.cfg.train
        if self.force or (self.marker.read() or {}).get("fingerprint") != fp:
            shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)
        self.marker.write(fp, epochs=tc.epochs, complete=False)  # same fingerprint next time: resume
        (d / "config.json").write_text(self.cfg.model_dump_json(indent=2))
        start_epoch = resume_epoch(d)
        if start_epoch:
            self.say(f"[yellow]train seed {self.seed}: resuming from {d / 'checkpoint'} at epoch {start_epoch + 1}")
        trainer = build_trainer(self.cfg, self.spec, self.prepare_dir, d, self.seed, start_epoch,
                                run_name=f"{self.cfg.name}-{'retrieval-' * (self.cfg.model.backbone == 'two_tower')}"
                                         f"seed{self.seed}")
        mode = data_mode(self.cfg, self.spec)
        self.say(f"[bold cyan]train[/] {self.cfg.model.backbone} seed {self.seed}: {tc.num_workers} worker(s), "
                 f"{self.spec.num_rows['train']:,} train rows"
                 f"{f' less those of {tc.holdout_scenarios} (held out)' if tc.holdout_scenarios else ''}, "
                 f"up to {tc.epochs} epochs, data in {mode} "
                 f"(~{shard_mib(self.cfg, self.spec):,.0f} MiB per worker in memory)")
        with self.progress(f"seed {self.seed}", tc.epochs, "epochs") as bar:
            with EpochWatcher(d, bar, start_epoch):
                trainer.fit()
        history = json.loads((d / "history.json").read_text())
        metrics = evaluate_train_dir(d, self.prepare_dir) if self.evaluate else {}
        return TrainResult(d, metrics, history, False, time.perf_counter() - self.t0)


def retrieval_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The experiment as its retrieval model trains and is evaluated: the two-tower model, the
    retrieval section's epochs / lr / weight decay / batch size, no perturbation, no rating targets (its
    in-batch softmax has no label to soften or cut), and top-K metrics up to N (how often a held-out
    positive is among the N candidates the ranking model will see)."""
    r = cfg.retrieval
    over = {k: v for k, v in (("epochs", r.epochs), ("lr", r.lr), ("weight_decay", r.weight_decay),
                              ("batch_size", r.batch_size)) if v is not None}
    return cfg.model_copy(update={
        "model": r.model,
        "train": cfg.train.model_copy(update={**over, "perturbation": "none", "soft_label": 0.0, "ordinal_cuts": []}),
        "evaluate": cfg.evaluate.model_copy(update={"top_k": sorted({10, 100, r.candidates})}),
        "retrieval": r.model_copy(update={"enabled": False}),  # no two-stage evaluation of itself
    })


def train_one(cfg: ExperimentConfig, prepare_dir: Path, train_dir: Path, seed: int, force: bool = False,
              evaluate: bool = True, quiet: bool = False) -> TrainResult:
    return TrainSeed(cfg, prepare_dir, train_dir, seed, force, evaluate, quiet).run()


def check_ready(cfg: ExperimentConfig, spec: FeatureSpec) -> None:
    """Before any worker starts: texts/embeddings, MLflow and synthetic rows the config asks for."""
    check_text_inputs(cfg.model, spec)
    check_tracking(cfg)
    if cfg.model.history.pooling and not spec.sequence:
        raise SetupError(f"model.history.pooling={cfg.model.history.pooling} needs behaviour-history columns, which "
                         "the prepared data lacks: set prepare.history (e.g. {length: 20}) and re-run `mcl-ray prepare`")
    for key, value in (("soft_label", cfg.train.soft_label), ("ordinal_cuts", cfg.train.ordinal_cuts)):
        if value and not spec.soft_label_column:
            raise SetupError(f"train.{key}={value} needs the label_soft column (each row's rating), which the "
                             "prepared data lacks: set prepare.label.soft: true and re-run `mcl-ray prepare`")
    want, got = cfg.prepare.validation.rating_range, spec.soft_label_range
    if cfg.train.ordinal_cuts and got is not None and tuple(want) != tuple(got):
        raise SetupError(f"train.ordinal_cuts: the prepared label_soft column was scaled by rating_range {list(got)}, "
                         f"this config says {list(want)}: re-run `mcl-ray prepare` with this config, or set "
                         f"prepare.validation.rating_range={list(got)}")
    if cfg.model.history.raters and not spec.raters:
        raise SetupError(f"model.history.raters={cfg.model.history.raters} needs the items' raters columns, which the "
                         "prepared data lacks: set prepare.history.raters (e.g. 20) and re-run `mcl-ray prepare`")
    unknown = [n for n in cfg.train.holdout_scenarios if n not in spec.scenario_names]
    if unknown:
        raise SetupError(f"train.holdout_scenarios: unknown scenario(s) {unknown}; the prepared data has "
                         f"{spec.scenario_names}")
    if len(set(cfg.train.holdout_scenarios)) >= spec.num_scenarios:
        raise SetupError("train.holdout_scenarios holds every scenario: nothing would be left to train on")
    if uses_synthetic(cfg) and spec.synthetic is None:
        raise SetupError("augment.enabled with augment.weight > 0 but no synthetic rows: run `mcl-ray augment "
                         "CONFIG` first (`mcl-ray run` does it), or set augment.weight=0")


class EpochWatcher:
    """Follows a running training from the driver: rank 0 writes progress.json (steps) and
    history.json (finished epochs) in the train folder; each finished epoch is printed once, here."""

    def __init__(self, train_dir: Path, bar, start_epoch: int = 0, period_s: float = 0.5):
        self.dir, self.bar, self.period = train_dir, bar, period_s
        self.printed = start_epoch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "EpochWatcher":
        self.bar.update(done=self.printed)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the last epoch may have landed after the final poll

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.poll()

    def poll(self) -> None:
        try:
            hist = json.loads((self.dir / "history.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being replaced
            hist = []
        for h in hist[self.printed:]:
            self.bar.print(f"  epoch {h['epoch'] + 1}: loss {h['train_loss']:.4f}  val AUC {h['val_auc']:.4f}  "
                           f"({h['samples_per_s']:,.0f} samples/s, {h['epoch_seconds']:.1f} s)")
        self.printed = max(self.printed, len(hist))
        info = f"val AUC {hist[-1]['val_auc']:.4f}" if hist else ""
        try:
            p = json.loads((self.dir / "progress.json").read_text())
            if p["epoch"] >= self.printed:
                info = f"batch {p['step']}/{p['steps']}" + (f"; {info}" if info else "")
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        self.bar.update(done=self.printed, info=info)


def build_trainer(cfg: ExperimentConfig, spec: FeatureSpec, prepare_dir: Path, out_dir: Path, seed: int,
                  start_epoch: int, run_name: str, callbacks: list | None = None, datasets: dict | None = None):
    """The TorchTrainer of one training run (a `train` seed or a Tune trial); its checkpoints live
    under out_dir, so the same run name + out_dir resumes where it stopped."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    tc = cfg.train
    mode = data_mode(cfg, spec)
    datasets = datasets or materialized_splits(spec, prepare_dir, tc.sample_rows, seed, uses_synthetic(cfg),
                                               stream=mode == "stream", holdout=holdout_ids(cfg, spec))
    args = LoopArgs(config=cfg, prepare_dir=str(prepare_dir.resolve()), out_dir=str(out_dir.resolve()), seed=seed,
                    start_epoch=start_epoch, run_name=run_name, data_mode=mode,
                    train_rows=datasets["train"].count())  # parquet metadata or materialised blocks: no read
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=args.model_dump(mode="json"),
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": tc.cpus_per_worker}
                                               if tc.num_workers else None,
                                               placement_strategy=tc.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str((out_dir / "ray_results").resolve()),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
            # Ray Train logs every report with its full metrics dict at INFO; we print our own epoch lines.
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets=datasets,
        # validation data goes whole to every worker, so all ranks take the same early-stopping decision
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def shard_mib(cfg: ExperimentConfig, spec: FeatureSpec) -> float:
    """What one worker's train shard takes as tensors (MiB), counting the Arrow copy it is made from."""
    rows = cfg.train.sample_rows.get("train", spec.num_rows.get("train", 0))
    row_bytes = (8 * len(spec.categorical) + 4 * len(spec.numeric) + 8 + 4 + 4 + 1  # ids, values, scenario, label...
                 + 4 * 3 * max([f.length or 0 for f in spec.sequence], default=0)  # history [3, L] int32
                 + 4 * 2 * max([f.length or 0 for f in spec.raters], default=0))  # raters [2, K] int32
    return 2 * rows / max(cfg.train.num_workers, 1) * row_bytes / 2**20


def data_mode(cfg: ExperimentConfig, spec: FeatureSpec) -> str:
    """train.data_mode resolved: auto streams when a worker's shard would not fit memory_budget_mb."""
    tc = cfg.train
    if tc.data_mode != "auto":
        return tc.data_mode
    return "stream" if shard_mib(cfg, spec) > tc.memory_budget_mb else "memory"


def holdout_ids(cfg: ExperimentConfig, spec: FeatureSpec) -> list[int]:
    """train.holdout_scenarios as scenario indices (names checked by check_ready)."""
    return [spec.scenario_names.index(n) for n in cfg.train.holdout_scenarios]


def materialized_splits(spec: FeatureSpec, prepare_dir: Path, sample: dict | None = None, seed: int = 0,
                        synthetic: bool = False, stream: bool = False, holdout: list[int] | None = None) -> dict:
    """train/valid as materialised Ray Datasets: workers that take every CPU would otherwise starve
    the read tasks (a sweep reads them once and hands the same blocks to every trial). A split
    named in `sample` (train.sample_rows) is a seeded row sample, read in the driver. With
    `synthetic`, the augment stage's rows join the training split (weighted in the loop). Rows of
    the `holdout` scenarios are dropped from both (train.holdout_scenarios)."""
    import pyarrow.compute as pc
    import ray.data

    def keep(t, col=spec.scenario_column, out=pa.array(sorted(holdout or []), pa.int64())):
        return t.filter(pc.invert(pc.is_in(pc.cast(t[col], pa.int64()), value_set=out)))

    cols = model_columns(spec)
    out = {}
    for s in ("train", "valid"):
        if s in (sample or {}):
            ds = dataset_in_blocks(read_split(prepare_dir, spec, s, sample=sample[s], seed=seed), 8)
        else:
            ds = ray.data.read_parquet(str((prepare_dir / spec.splits[s]).resolve())).select_columns(cols)
        if s == "train" and synthetic and spec.synthetic is not None:  # the training split only, ever
            ds = ds.union(ray.data.read_parquet(str((prepare_dir / spec.synthetic.table).resolve()))
                          .select_columns(cols))
        if holdout:
            ds = ds.map_batches(keep, batch_format="pyarrow")
        # stream: the train split stays lazy (workers read it block by block; the object store never
        # holds it whole); validation is small and read by every worker each epoch
        out[s] = ds if stream and s == "train" and s not in (sample or {}) else ds.materialize()
    return out


def resume_epoch(out_dir: Path) -> int:
    """Epochs already done by the checkpoint in out_dir (0 when there is none)."""
    resume_dir = out_dir / "checkpoint"
    if ck.has_checkpoint(resume_dir):
        return json.loads((resume_dir / ck.STATE).read_text())["state"]["epoch"]
    return 0
