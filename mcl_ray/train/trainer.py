"""Driver side of training: build the TorchTrainer, run it per seed, evaluate, summarise."""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from mcl_ray.config import ExperimentConfig
from mcl_ray.feature_spec import FeatureSpec
from mcl_ray.models.text import check_text_inputs
from mcl_ray.train import checkpoint as ck
from mcl_ray.train.tensors import columns_for


@dataclass
class TrainResult:
    train_dir: Path
    metrics: dict  # test metrics
    history: list[dict]
    cached: bool
    seconds: float


def train_fingerprint(cfg: ExperimentConfig, spec: FeatureSpec, seed: int, prepare_dir: Path | None = None) -> str:
    blob = {"model": cfg.model.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
            "seed": seed, "data": spec.data_fingerprint}
    if uses_synthetic(cfg):  # other synthetic rows or weight: another run
        blob["augment"] = {"weight": cfg.augment.weight, "rows": spec.synthetic.fingerprint if spec.synthetic else None}
    if cfg.model.text.mode == "frozen" and prepare_dir is not None:  # other embeddings: another run
        # the encoder's fingerprint (texts are covered by the data fingerprint), not the encode run's stats
        blob["embeddings"] = {f: json.loads((prepare_dir / spec.text[f].embedding).with_suffix(".json").read_text())
                              ["fingerprint"] for f in cfg.model.text.fields if f in spec.text and spec.text[f].embedding}
    # Scale-out settings do not change what is learned enough to invalidate a run, and a larger
    # `epochs` continues a run from its last checkpoint instead of starting over.
    for k in ("num_workers", "use_gpu", "cpus_per_worker", "max_failures", "eval_batch_size", "epochs"):
        blob["train"].pop(k)
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def uses_synthetic(cfg: ExperimentConfig) -> bool:
    return cfg.augment.enabled and cfg.augment.weight > 0


class SetupError(RuntimeError):
    """Something the config asks for is missing (MLflow, synthetic rows); the message says how to fix it."""


def check_tracking(cfg: ExperimentConfig) -> None:
    if cfg.tracking.mlflow_uri:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise SetupError("tracking.mlflow_uri is set but MLflow is not installed: "
                             "pip install 'mcl-ray[tracking]' (mlflow-skinny), or set tracking.mlflow_uri=null") from None


def train_one(cfg: ExperimentConfig, prepare_dir: Path, train_dir: Path, seed: int, force: bool = False,
              console=None, evaluate: bool = True) -> TrainResult:
    t0 = time.perf_counter()
    spec = FeatureSpec.load(prepare_dir)
    check_text_inputs(cfg.model, spec)
    check_tracking(cfg)
    if uses_synthetic(cfg) and spec.synthetic is None:
        raise SetupError("augment.enabled with augment.weight > 0 but no synthetic rows: run `mcl-ray augment "
                            "CONFIG` first (`mcl-ray run` does it), or set augment.weight=0")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
    fp = train_fingerprint(cfg, spec, seed, prepare_dir)
    fp_file = train_dir / "fingerprint.json"
    same = fp_file.exists() and json.loads(fp_file.read_text())["fingerprint"] == fp
    finished = same and (train_dir / "metrics.json").exists() and json.loads(
        (train_dir / "config.json").read_text())["train"]["epochs"] == cfg.train.epochs
    if finished and not force:
        say(console, f"[green]train seed {seed}: finished run with the same config and data; reusing {train_dir}")
        return TrainResult(train_dir, json.loads((train_dir / "metrics.json").read_text()),
                           json.loads((train_dir / "history.json").read_text()), True, 0.0)
    if force or not same:
        shutil.rmtree(train_dir, ignore_errors=True)
    train_dir.mkdir(parents=True, exist_ok=True)
    fp_file.write_text(json.dumps({"fingerprint": fp}))
    (train_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    start_epoch = resume_epoch(train_dir)
    if start_epoch:
        say(console, f"[yellow]train seed {seed}: resuming from {train_dir / 'checkpoint'} at epoch {start_epoch + 1}")

    trainer = build_trainer(cfg, spec, prepare_dir, train_dir, seed, start_epoch, run_name=f"{cfg.name}-seed{seed}")
    tc = cfg.train
    say(console, f"[bold cyan]train[/] {cfg.model.backbone} seed {seed}: {tc.num_workers} worker(s), "
                 f"{spec.num_rows['train']:,} train rows, up to {tc.epochs} epochs")
    trainer.fit()
    history = json.loads((train_dir / "history.json").read_text())
    for h in history:
        say(console, f"  epoch {h['epoch'] + 1}: loss {h['train_loss']:.4f}  val AUC {h['val_auc']:.4f}  "
                     f"({h['samples_per_s']:,.0f} samples/s)")
    metrics = {}
    if evaluate:
        from mcl_ray.evaluate.evaluate import evaluate_train_dir

        metrics = evaluate_train_dir(train_dir, prepare_dir)
    return TrainResult(train_dir, metrics, history, False, time.perf_counter() - t0)


def build_trainer(cfg: ExperimentConfig, spec: FeatureSpec, prepare_dir: Path, out_dir: Path, seed: int,
                  start_epoch: int, run_name: str, callbacks: list | None = None, datasets: dict | None = None):
    """The TorchTrainer of one training run (a `train` seed or a Tune trial); its checkpoints live
    under out_dir, so the same run name + out_dir resumes where it stopped."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from mcl_ray.train.loop import train_loop_per_worker

    tc = cfg.train
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "prepare_dir": str(prepare_dir.resolve()),
                           "out_dir": str(out_dir.resolve()), "seed": seed,
                           "resume_dir": str((out_dir / "checkpoint").resolve()), "start_epoch": start_epoch,
                           "run_name": run_name},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": tc.cpus_per_worker}
                                               if tc.num_workers else None),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str((out_dir / "ray_results").resolve()),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
            # Ray Train logs every report with its full metrics dict at INFO; we print our own epoch lines.
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets=datasets or materialized_splits(spec, prepare_dir, cfg.train.sample_rows, seed, uses_synthetic(cfg)),
        # validation data goes whole to every worker, so all ranks take the same early-stopping decision
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def materialized_splits(spec: FeatureSpec, prepare_dir: Path, sample: dict | None = None, seed: int = 0,
                        synthetic: bool = False) -> dict:
    """train/valid as materialised Ray Datasets: workers that take every CPU would otherwise starve
    the read tasks (a sweep reads them once and hands the same blocks to every trial). A split
    named in `sample` (train.sample_rows) is a seeded row sample, read in the driver. With
    `synthetic`, the augment stage's rows join the training split (weighted in the loop)."""
    import ray.data

    from mcl_ray.ray_env import dataset_in_blocks
    from mcl_ray.train.tensors import read_split

    cols = columns_for(spec)
    out = {}
    for s in ("train", "valid"):
        if s in (sample or {}):
            ds = dataset_in_blocks(read_split(prepare_dir, spec, s, sample=sample[s], seed=seed), 8)
        else:
            ds = ray.data.read_parquet(str((prepare_dir / spec.splits[s]).resolve())).select_columns(cols)
        if s == "train" and synthetic and spec.synthetic is not None:  # the training split only, ever
            ds = ds.union(ray.data.read_parquet(str((prepare_dir / spec.synthetic.table).resolve()))
                          .select_columns(cols))
        out[s] = ds.materialize()
    return out


def resume_epoch(out_dir: Path) -> int:
    """Epochs already done by the checkpoint in out_dir (0 when there is none)."""
    resume_dir = out_dir / "checkpoint"
    if ck.has_checkpoint(resume_dir):
        return json.loads((resume_dir / ck.STATE).read_text())["state"]["epoch"]
    return 0


def summarize(results: list[TrainResult]) -> dict:
    """Mean and (sample) standard deviation over seeds of overall and per-scenario AUC/logloss."""
    def agg(values):
        values = [v for v in values if v == v]
        return {"mean": statistics.fmean(values) if values else float("nan"),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}

    ms = [r.metrics for r in results]
    out = {"overall": {m: agg([x["overall"][m] for x in ms]) for m in ("auc", "logloss", "gauc")},
           "by_scenario": {}}
    for name in ms[0]["by_scenario"]:
        out["by_scenario"][name] = {m: agg([x["by_scenario"][name][m] for x in ms]) for m in ("auc", "logloss")}
    if all("ranking" in x for x in ms):
        out["ranking"] = {}
        for name in ms[0]["ranking"]:
            keys = [k for k in ms[0]["ranking"][name] if "@" in k]
            out["ranking"][name] = {k: agg([x["ranking"][name][k] for x in ms if name in x["ranking"]]) for k in keys}
    out["seeds"] = [r.metrics.get("seed") for r in results]
    out["backbone"] = ms[0].get("backbone")
    return out


def train(cfg: ExperimentConfig, prepare_dir: Path, run_dir: Path, seeds: int = 1, force: bool = False,
          console=None) -> tuple[list[TrainResult], dict]:
    results = [train_one(cfg, prepare_dir, run_dir / "train" / f"seed_{cfg.train.seed + i}", cfg.train.seed + i,
                         force=force, console=console) for i in range(seeds)]
    summary = summarize(results)
    (run_dir / "train" / "summary.json").write_text(json.dumps(summary, indent=2))
    return results, summary


def say(console, msg: str) -> None:
    if console is not None:
        console.print(msg)
