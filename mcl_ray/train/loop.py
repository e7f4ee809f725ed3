"""The per-worker training loop: flat and readable. Runs under Ray Train (DDP) or, with
num_workers=0, in the driver. Rank 0 writes checkpoints; every rank reports."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from mcl_ray.core.config import ExperimentConfig
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.data.texts import PreparedTexts
from mcl_ray.evaluate.evaluate import predict
from mcl_ray.evaluate.metrics import binary_metrics
from mcl_ray.models.backbones import build_model
from mcl_ray.models.batch import Batch, shard_to_batch
from mcl_ray.models.text import attach_texts
from mcl_ray.models.weights import MODEL, save_weights, weights_digest
from mcl_ray.train import checkpoint as ck
from mcl_ray.train.optim import make_optimizer, make_sparse
from mcl_ray.train.ordinal import OrdinalCuts
from mcl_ray.train.perturb import clear, input_layers, set_deltas


def _quiet_report_logs() -> None:
    """Ray Train logs every report with its whole metrics dict at INFO, under a logger named after
    its source file (so outside the "ray.train" hierarchy); the driver prints its own epoch lines.
    Cosmetic only, hence tolerant of that internal module moving in another Ray version."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


class LoopArgs(BaseModel):
    """What the driver hands every worker (Ray Train passes it as a plain dict)."""

    model_config = ConfigDict(extra="forbid")
    config: ExperimentConfig
    prepare_dir: str
    out_dir: str  # the run's folder: weights, history, checkpoint, TensorBoard
    seed: int
    start_epoch: int = 0  # epochs done when this run was started (tells a worker failure from a rerun)
    run_name: str | None = None  # the MLflow run name
    data_mode: Literal["memory", "stream"] = "memory"  # train.data_mode, resolved by the driver
    train_rows: int = 0  # rows of the train dataset (stream: every rank's step count comes from it)


def train_loop_per_worker(loop_cfg: dict) -> None:
    """Set up (data, model, resume, trackers), then per epoch: train -> validate -> log -> save + report."""
    import ray.train
    import ray.train.torch

    _quiet_report_logs()
    args = LoopArgs.model_validate(loop_cfg)
    tc, out_dir = args.config.train, Path(args.out_dir)
    spec = FeatureSpec.load(args.prepare_dir)
    torch.set_num_threads(tc.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")

    t_load = time.perf_counter()
    stream = args.data_mode == "stream"
    train_it, valid_it = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("valid")
    # memory: tensors once, shuffled slices every epoch; stream: the shard batch by batch, never whole
    train = None if stream else shard_to_batch(train_it, spec)
    valid = None if stream else shard_to_batch(valid_it, spec)
    load_s = time.perf_counter() - t_load
    model, opt, sched, ordinal = build(args, spec, world, device)
    state = resume(args, model, opt, sched)
    if ordinal is not None and "ordinal_offsets" in state:  # resumed: the learned offsets too
        ordinal.offset.data.copy_(torch.tensor(state["ordinal_offsets"]))
    if rank == 0:  # lets operators (and the failure test) find the worker process
        (out_dir / f"worker_rank{rank}.pid").write_text(str(os.getpid()))
    # where each rank ran (node, process, data mode): placement on a cluster can be checked
    _write_json(out_dir / f"worker_rank{rank}.json", {"rank": rank, "world": world, "pid": os.getpid(),
                                                     "node_id": ray.get_runtime_context().get_node_id(),
                                                     "data_mode": args.data_mode})
    log = EpochLog(args, spec, rank)

    # Every rank must run the same number of steps or DDP's all-reduce hangs. Streamed shards are
    # equal by construction (Ray Train splits with equal=True): train_rows // world rows each.
    n = torch.tensor([args.train_rows // max(world, 1) if stream else len(train)])
    if world > 1:
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
    n = int(n)
    for epoch in range(state["epoch"], tc.epochs):
        t0 = time.perf_counter()
        batches = (stream_batches(train_it, spec, n, epoch, args, rank, world) if stream
                   else memory_batches(train, n, epoch, args, rank, world))
        loss = train_epoch(model, opt, batches, n, epoch, args, rank, world, device, ordinal)
        if sched is not None:
            sched.step()
        train_s = time.perf_counter() - t0
        if stream:
            y, p, scen = predict_stream(model, valid_it, spec, tc.eval_batch_size, device)
        else:
            y, p, scen = valid.label.numpy(), predict(model, valid, tc.eval_batch_size, device), valid.scenario.numpy()
        val = binary_metrics(y, p, scen, spec.scenario_names)
        auc = val["overall"]["auc"]
        improved = auc > state["best_auc"]
        if improved:
            state.update(best_auc=auc, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        metrics = {"epoch": epoch, "train_loss": loss, "val_auc": auc,
                   "val_logloss": val["overall"]["logloss"], "best_val_auc": state["best_auc"],
                   "epoch_seconds": train_s, "samples_per_s": n * max(world, 1) / train_s,
                   "load_seconds": load_s, "world_size": world,
                   **{f"val_auc/{k}": v["auc"] for k, v in val["by_scenario"].items()}}
        state["history"].append(metrics)
        state["epoch"] = epoch + 1
        if ordinal is not None:
            state["ordinal_offsets"] = ordinal.offset.tolist()
        log.epoch(metrics)
        save_and_report(model, opt, sched, state, metrics, improved, out_dir, rank)
        if state["bad_epochs"] >= tc.patience:
            break
    log.close()


def build(args: LoopArgs, spec: FeatureSpec, world: int, device: torch.device):
    """-> (model, optimizer, scheduler, ordinal cuts or None), identical initial weights on every rank."""
    import ray.train.torch

    torch.manual_seed(args.seed)
    model = build_model(spec, args.config.model)
    attach_texts(model, PreparedTexts(args.prepare_dir, spec))  # text tables / token ids (no-op without texts)
    tc = args.config.train
    if not tc.use_gpu:  # big id tables: sparse gradients + lazy Adam (NCCL cannot all-reduce them)
        make_sparse(model, tc.sparse_embedding_rows)
    if world > 1:
        # DDP: gloo on CPU, NCCL on GPU. Scenario-specific blocks run even on zero rows, so every
        # parameter gets a gradient each step and DDP can skip the unused-parameter search. Buffers
        # (text token ids) never change: no need to broadcast them before every forward.
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    else:
        model = model.to(device)
    ordinal = OrdinalCuts.from_config(args.config, spec)
    if ordinal is not None:
        ordinal = ordinal.to(device)
    return (model, *make_optimizer(tc, model, [] if ordinal is None else [ordinal.offset]), ordinal)


def resume(args: LoopArgs, model, opt, sched) -> dict:
    """The training state to continue from: Ray Train hands back the latest reported checkpoint both
    after a worker failure and when the same run (name + storage path) is started again;
    start_epoch tells the two apart. Without one, the run folder's own checkpoint (Ray's run state
    was removed), else a fresh state."""
    import ray.train

    state = {"epoch": 0, "best_auc": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": []}
    own = Path(args.out_dir) / "checkpoint"
    reported = ray.train.get_checkpoint()
    if reported is not None:
        with reported.as_directory() as d:
            state = ck.load_checkpoint(d, model, opt, sched)
    elif ck.has_checkpoint(own):
        state = ck.load_checkpoint(own, model, opt, sched)
    if state["epoch"] > 0:
        kind = "failure" if state["epoch"] > args.start_epoch else "rerun"
        state.setdefault("resumes", []).append({"from": kind, "epoch": state["epoch"],
                                                "weights": weights_digest(model)})
    return state


def _per_rank(args: LoopArgs, world: int) -> int:
    return max(1, args.config.train.batch_size // max(world, 1))


def memory_batches(train: Batch, n: int, epoch: int, args: LoopArgs, rank: int, world: int) -> Iterator[Batch]:
    """This rank's first n rows in a seeded shuffle, batch by batch (slices of the tensors in memory)."""
    per_rank = _per_rank(args, world)
    g = torch.Generator().manual_seed(args.seed * 100_003 + epoch * 101 + rank)
    perm = torch.randperm(len(train), generator=g)[:n]
    for i in range(0, n, per_rank):
        yield train.take(perm[i:i + per_rank])


def stream_batches(shard, spec: FeatureSpec, n: int, epoch: int, args: LoopArgs, rank: int,
                   world: int) -> Iterator[Batch]:
    """This rank's Ray Data shard, streamed through a seeded local shuffle buffer: n rows at most,
    so every rank takes the same number of steps."""
    per_rank = _per_rank(args, world)
    left = n
    for table in shard.iter_batches(batch_size=per_rank, batch_format="pyarrow",
                                    local_shuffle_buffer_size=args.config.train.shuffle_buffer_rows,
                                    local_shuffle_seed=args.seed * 100_003 + epoch * 101 + rank):
        if left <= 0:
            return
        table = table.slice(0, left)
        left -= table.num_rows
        yield Batch.from_table(table, spec)


@torch.no_grad()
def predict_stream(model, shard, spec: FeatureSpec, batch_size: int, device: torch.device):
    """(labels, probabilities, scenarios) of a dataset iterated batch by batch."""
    ys, ps, ss = [], [], []
    for table in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        b = Batch.from_table(table, spec)
        ys.append(b.label.numpy())
        ps.append(predict(model, b, batch_size, device))
        ss.append(b.scenario.numpy())
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    return cat(ys, np.float32), cat(ps, np.float32), cat(ss, np.int64)


def denoise_weights(loss: torch.Tensor, synthetic: torch.Tensor, w: torch.Tensor, share: float) -> torch.Tensor:
    """LLMRec's noise pruning: the `share` of this batch's synthetic rows with the highest loss get
    weight 0 (real rows are never dropped). loss, synthetic, w: [B]."""
    syn = synthetic.nonzero(as_tuple=True)[0]
    k = int(len(syn) * share)
    if k == 0:
        return w
    drop = syn[torch.topk(loss[syn], k).indices]
    return w.index_fill(0, drop, 0.0)


def soft_target(b: Batch, soft: float) -> torch.Tensor:
    """train.soft_label: the ranking loss's target, (1 - a) * label + a * label_soft ([B]); a = 0: the label."""
    return b.label if not soft else (1 - soft) * b.label + soft * b.soft


def ranking_loss(logits: torch.Tensor, b: Batch, soft: float, ordinal: OrdinalCuts | None = None,
                 ordinal_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (each row's loss, its label part) [B]: BCE towards soft_target, plus train.ordinal_cuts' terms on
    real rows (a synthetic row has no rating to cut). Denoising ranks synthetic rows by the label part."""
    label_loss = F.binary_cross_entropy_with_logits(logits, soft_target(b, soft), reduction="none")
    if ordinal is None:
        return label_loss, label_loss
    return label_loss + ordinal_weight * ordinal(logits, b.soft) * ~b.synthetic, label_loss


def train_epoch(model, opt, batches: Iterable[Batch], n: int, epoch: int, args: LoopArgs, rank: int, world: int,
                device: torch.device, ordinal: OrdinalCuts | None = None) -> float:
    """One pass over this rank's n rows (from memory or a stream); returns the mean batch loss."""
    cfg, tc = args.config, args.config.train
    model.train()
    per_rank = _per_rank(args, world)
    steps = max(1, math.ceil(n / per_rank))
    report_every = max(1, steps // 20)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if tc.precision == "bf16" else torch.float16)
                if tc.use_gpu and tc.precision != "fp32" else torch.autocast("cpu", enabled=False))
    scaler = torch.amp.GradScaler("cuda") if tc.use_gpu and tc.precision == "fp16" else None
    aug_w = cfg.augment.weight if cfg.augment.enabled else 0.0
    denoise = cfg.augment.denoise_share if aug_w > 0 else 0.0
    perturb = tc.perturbation != "none"
    soft = tc.soft_label
    for layer in input_layers(model):
        layer.capture = perturb
    backward = (lambda x: scaler.scale(x).backward()) if scaler is not None else (lambda x: x.backward())  # noqa: E731
    loss_sum, done = 0.0, 0
    for i, b in enumerate(batches):
        done += 1
        if tc.use_gpu:
            b = b.to(device, non_blocking=True)
        # synthetic (augment) rows count augment.weight times a real row (0: not at all)
        w = torch.where(b.synthetic, aug_w, 1.0) * b.weight

        def loss_of(b=b, w=w) -> torch.Tensor:
            with autocast:
                logits = model(b)  # [B]; a retrieval model: [P, P] in-batch logits of the positive rows
                if logits.dim() == 2:  # softmax with each row's own item (the diagonal) the target
                    w = w[b.label > 0]
                    loss = F.cross_entropy(logits.float(), torch.arange(len(logits), device=logits.device),
                                           reduction="none")
                else:
                    loss, label_loss = ranking_loss(logits.float(), b, soft, ordinal, tc.ordinal_weight)
                    if denoise > 0:
                        w = denoise_weights(label_loss.detach(), b.synthetic, w, denoise)
                return (loss * w).sum() / w.sum().clamp(min=1e-12)

        opt.zero_grad(set_to_none=True)
        if not perturb:
            loss = loss_of()
            backward(loss)
        else:
            # clean + perturbed loss: the clean pass's gradients stay local (DDP no_sync) and are
            # all-reduced together with the perturbed pass's, once per step
            try:
                with model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext():
                    loss = loss_of()
                    set_deltas(tc.perturbation, tc.perturbation_eps, tc.perturbation_steps, model, loss_of, loss,
                               scale=scaler.scale if scaler is not None else (lambda x: x))
                    backward(loss)
                adv = loss_of()
            finally:
                clear(input_layers(model))
            backward(adv)
        if ordinal is not None:
            ordinal.sync_grads(world)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        loss_sum += float(loss.detach())
        if rank == 0 and (i + 1) % report_every == 0:  # the driver's progress bar reads it
            _write_json(Path(args.out_dir) / "progress.json", {"epoch": epoch, "step": i + 1, "steps": steps})
    for layer in input_layers(model):  # (an exception ends the worker: a retry builds a fresh model)
        layer.capture = False
    return loss_sum / max(done, 1)


def save_and_report(model, opt, sched, state: dict, metrics: dict, improved: bool, out_dir: Path, rank: int) -> None:
    """Rank 0: best weights, the run folder's checkpoint, history.json (the driver prints each new
    epoch from it) and the checkpoint Ray Train keeps; every rank reports."""
    import ray.train

    ckpt = None
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            if improved:
                save_weights(model, out_dir / "best_model.tmp")
                os.replace(out_dir / "best_model.tmp", out_dir / MODEL)
            ck.save_checkpoint(out_dir / "checkpoint", model, opt, sched, state)
            ck.save_checkpoint(Path(tmp) / "c", model, opt, sched, state)
            _write_json(out_dir / "history.json", state["history"])
            ckpt = ray.train.Checkpoint.from_directory(str(Path(tmp) / "c"))
        ray.train.report(metrics, checkpoint=ckpt)


class EpochLog:
    """Per-epoch metrics to TensorBoard event files (rank 0, always) and MLflow (when configured)."""

    def __init__(self, args: LoopArgs, spec: FeatureSpec, rank: int):
        cfg = args.config
        self.tb = self.mlf = None
        if rank == 0:  # tensorboard --logdir runs/
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(args.out_dir) / "tensorboard"), flush_secs=10)
        if cfg.tracking.mlflow_uri:  # rank 0 only (Ray's helper returns a no-op module elsewhere)
            from ray.air.integrations.mlflow import setup_mlflow

            params = {f"{sec}.{k}": v for sec in ("model", "train") for k, v in getattr(cfg, sec).model_dump().items()}
            self.mlf = setup_mlflow(config={**params, "seed": args.seed, "data_fingerprint": spec.data_fingerprint},
                                    tracking_uri=cfg.tracking.mlflow_uri,
                                    experiment_name=cfg.tracking.mlflow_experiment or cfg.name,
                                    run_name=args.run_name, create_experiment_if_not_exists=True)

    def epoch(self, metrics: dict) -> None:
        step = metrics["epoch"] + 1
        if self.tb is not None:
            for k, v in metrics.items():
                if k not in ("epoch", "world_size"):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.mlf is not None:
            self.mlf.log_metrics(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlf is not None:
            self.mlf.end_run()


def _write_json(path: Path, obj) -> None:
    """Atomic: the driver polls these files while training runs."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
