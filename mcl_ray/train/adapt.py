"""A new scenario from few labelled rows: `mcl-ray adapt`.

The scenario is one the prepared data knows (its rows are mapped and encoded like every other's)
and the base model never trained on (`train.holdout_scenarios`), so its own parameters are
untrained. Three methods give them values from k labelled rows:

- finetune: start from the mean of the trained scenarios' parameters, train on the k rows;
- meta: start from an initialisation meta-learned over the trained scenarios as tasks (Reptile,
  first-order MAML: Nichol et al. 2018), train the same way;
- scratch: a fresh model trained on the k rows alone: what the multi-scenario model is worth.

meta and finetune change the new scenario's parameters only, so every other scenario scores
exactly as before. The k rows are split once: `valid_share` of them for early stopping; the
scenario's validation split is not used (a new scenario would not have one). Small data: it runs
in this process, no Ray.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mcl_ray.core.config import AdaptConfig, ExperimentConfig
from mcl_ray.core.errors import SetupError
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.core.files import file_digest
from mcl_ray.core.stage import Marker, Stage, fingerprint
from mcl_ray.data.splits import iter_scenarios, scenario_rows
from mcl_ray.data.texts import PreparedTexts
from mcl_ray.evaluate.evaluate import evaluate_train_dir, predict
from mcl_ray.evaluate.metrics import auc_logloss
from mcl_ray.models.backbones import build_model
from mcl_ray.models.batch import Batch
from mcl_ray.models.blocks import InputLayer
from mcl_ray.models.slots import ScenarioSlots
from mcl_ray.models.text import attach_texts
from mcl_ray.models.weights import MODEL, load_trained, save_weights, weights_digest


@dataclass
class AdaptResult:
    out_dir: Path | None
    scenario: str
    method: str
    k: int
    rows: dict  # fit / early-stopping / test rows of the scenario
    test: dict  # the scenario's test AUC / logloss after adaptation
    init_test: dict | None  # before adaptation (the initialisation alone; None for scratch)
    history: list[dict] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    changed: int = 0  # parameters (elements) that differ from the base model
    cached: bool = False


def weighted_bce(model: torch.nn.Module, b: Batch) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(model(b), b.label, reduction="none")
    return (loss * b.weight).sum() / b.weight.sum().clamp(min=1e-12)


def as_scenario(b: Batch, s: int) -> Batch:
    return replace(b, scenario=torch.full_like(b.scenario, s))


def draw(data: Batch, n: int, gen: torch.Generator) -> Batch:
    """n rows without replacement (all of them, shuffled, when n >= the rows)."""
    return data.take(torch.randperm(len(data), generator=gen)[:n])


def reptile(model: torch.nn.Module, slots: ScenarioSlots, target: int, tasks: dict[int, Batch],
            ac: AdaptConfig, init: list[torch.Tensor], bar=None) -> list[torch.Tensor]:
    """Reptile over the trained scenarios: each outer step runs `inner_steps` of SGD on one
    scenario's rows through the target slot, from phi, and moves phi toward where they ended:
    phi += eps_t * (theta - phi), eps_t annealed linearly from outer_lr to 0. Returns phi."""
    gen = torch.Generator().manual_seed(ac.seed)
    phi = [p.clone() for p in init]
    order = sorted(tasks)
    model.train()
    with slots.only(model, target) as params:
        for t in range(ac.meta_steps):
            task = tasks[order[int(torch.randint(len(order), (1,), generator=gen))]]
            slots.set(model, target, phi)
            opt = torch.optim.SGD(params, lr=ac.inner_lr)
            for _ in range(ac.inner_steps):
                opt.zero_grad(set_to_none=True)
                weighted_bce(model, as_scenario(draw(task, ac.batch_size, gen), target)).backward()
                opt.step()
            eps = ac.outer_lr * (1 - t / ac.meta_steps)
            phi = [p + eps * (q - p) for p, q in zip(phi, slots.get(model, target))]
            if bar is not None:
                bar.update(done=t + 1)
    slots.set(model, target, phi)
    return phi


def fit(model: torch.nn.Module, params: list[torch.nn.Parameter], train: Batch, hold: Batch, ac: AdaptConfig,
        bar=None) -> list[dict]:
    """Adam on `params` over the fit rows, checked on the held-back rows every eval_every steps or
    every epoch over the fit rows, whichever is sooner (few rows overfit within a few epochs). The
    best check by held-back AUC, as training stops on validation AUC (by logloss when the held-back
    rows hold one label), is kept; step 0, the start, counts."""
    gen = torch.Generator().manual_seed(ac.seed + 1)
    opt = torch.optim.Adam(params, lr=ac.lr, weight_decay=0.0)  # no decay: frozen entries stay exact
    by_auc = 0 < float(hold.label.sum()) < len(hold)

    def check(step: int, loss: float | None) -> dict:
        m = auc_logloss(hold.label.numpy(), predict(model, hold, 65_536, torch.device("cpu")))
        return {"epoch": len(history), "step": step, "train_loss": loss, "val_auc": m["auc"],
                "val_logloss": m["logloss"]}

    def score(h: dict) -> float:
        return h["val_auc"] if by_auc else -h["val_logloss"]

    history: list[dict] = []
    history.append(check(0, None))
    best, kept, kept_at, bad = score(history[0]), [p.detach().clone() for p in params], 0, 0
    batch = min(ac.batch_size, len(train))
    every = min(ac.eval_every, -(-len(train) // batch))
    losses = []
    for step in range(1, ac.max_steps + 1):
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = weighted_bce(model, draw(train, batch, gen))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % every and step != ac.max_steps:
            continue
        history.append(check(step, float(np.mean(losses))))
        losses = []
        if bar is not None:
            bar.update(done=step, info=f"held-back AUC {history[-1]['val_auc']:.4f}")
        if score(history[-1]) >= best:  # a tie goes on: AUC over few held-back rows often ties
            best, kept, kept_at, bad = score(history[-1]), [p.detach().clone() for p in params], len(history) - 1, 0
        else:
            bad += 1
            if bad >= ac.patience:
                break
    with torch.no_grad():
        for p, v in zip(params, kept):
            p.copy_(v)
    for i, h in enumerate(history):  # the check whose parameters were kept
        h["kept"] = i == kept_at
    model.train(False)
    return history


def scenario_metrics(model: torch.nn.Module, prepare_dir: Path, spec: FeatureSpec, s: int, split: str = "test",
                     batch_rows: int = 65_536) -> dict:
    """AUC / logloss of scenario s's rows in a split, streamed batch by batch."""
    ys, ps = [], []
    for t in iter_scenarios(prepare_dir, spec, split, [s], batch_rows):
        if t.num_rows:
            b = Batch.from_table(t, spec)
            ys.append(b.label.numpy())
            ps.append(predict(model, b, batch_rows, torch.device("cpu")))
    if not ys:
        raise SetupError(f"scenario {spec.scenario_names[s]!r} has no rows in the {split} split")
    return auc_logloss(np.concatenate(ys), np.concatenate(ps))


def changed_elements(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    return sum(int((a[k] != b[k]).sum()) for k in a)


class Adapter:
    """The pieces of one adaptation, reusable across methods and k (a benchmark loads the base
    model and the meta-learning tasks once)."""

    def __init__(self, train_dir: Path, prepare_dir: Path, scenario: str):
        self.train_dir, self.prepare_dir = Path(train_dir), Path(prepare_dir)
        self.cfg = ExperimentConfig.model_validate_json((self.train_dir / "config.json").read_text())
        self.spec = spec = FeatureSpec.load(self.prepare_dir)
        if scenario not in spec.scenario_names:
            raise SetupError(f"unknown scenario {scenario!r}: the prepared data has {spec.scenario_names}. A new "
                             "scenario must be declared in prepare.scenario (its rows are encoded there) and kept "
                             "out of training with train.holdout_scenarios")
        self.scenario, self.target = scenario, spec.scenario_names.index(scenario)
        self.trained = [s for s, n in enumerate(spec.scenario_names)
                        if n not in self.cfg.train.holdout_scenarios and s != self.target]
        if not self.trained:
            raise SetupError("the base model trained on no other scenario: there is nothing to adapt from")
        self.slots = ScenarioSlots(spec, self.cfg.model)
        self.base = load_trained(spec, self.cfg.model, self.train_dir / MODEL)
        self.base_state = {k: v.clone() for k, v in self.base.state_dict().items()}
        self.was_trained = scenario not in self.cfg.train.holdout_scenarios
        self._new_ids: dict[str, torch.Tensor] | None = None
        self.new_id_rows: dict[str, int] = {}

    def new_id_masks(self) -> dict[str, torch.Tensor]:
        """{embedding parameter: row mask} of the ids that no trained scenario's train row uses (OOV,
        id 0, excluded): only the new scenario's rows look them up. One streamed pass, cached."""
        if self._new_ids is None:
            used = [np.zeros(f.vocab_size, bool) for f in self.spec.categorical]
            for t in iter_scenarios(self.prepare_dir, self.spec, "train", self.trained):
                for i, f in enumerate(self.spec.categorical):
                    used[i][t[f.name].to_numpy()] = True
            self._new_ids = {}
            if self.cfg.model.backbone != "single":  # single: a scenario's input layer is its own already
                for name, layer in self.base.named_modules():
                    if isinstance(layer, InputLayer):
                        for i, emb in enumerate(layer.embeddings):
                            rows = ~used[i]
                            rows[0] = False
                            if rows.any():
                                key = f"{name}.embeddings.{i}.weight".lstrip(".")
                                self._new_ids[key] = torch.from_numpy(rows)[:, None].float()  # [V, 1]: broadcast
            self.new_id_rows = {f.name: int((~used[i][1:]).sum()) for i, f in enumerate(self.spec.categorical)}
        return self._new_ids

    @staticmethod
    def extra_numel(model: torch.nn.Module, extra: dict[str, torch.Tensor]) -> int:
        params = dict(model.named_parameters())
        return sum(int(m.expand_as(params[n]).sum()) for n, m in extra.items())

    def rows(self, ac: AdaptConfig) -> tuple[Batch, Batch]:
        """(fit, held back): a seeded sample of k of the scenario's train rows, split once."""
        t = scenario_rows(self.prepare_dir, self.spec, "train", [self.target], n=ac.k, seed=ac.seed)
        if t.num_rows < 2:
            raise SetupError(f"scenario {self.scenario!r} has {t.num_rows} train row(s); adapt needs at least 2")
        rows = Batch.from_table(t, self.spec)
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(ac.seed))
        n_hold = min(len(rows) - 1, max(1, round(ac.valid_share * len(rows))))
        return rows.take(perm[n_hold:]), rows.take(perm[:n_hold])

    def tasks(self, ac: AdaptConfig) -> dict[int, Batch]:
        """meta: up to meta_rows train rows of each trained scenario."""
        return {s: Batch.from_table(scenario_rows(self.prepare_dir, self.spec, "train", [s], n=ac.meta_rows,
                                                  seed=ac.seed), self.spec) for s in self.trained}

    def meta_init(self, ac: AdaptConfig, tasks: dict[int, Batch] | None = None, bar=None) -> list[torch.Tensor]:
        model = self.fresh_base()
        return reptile(model, self.slots, self.target, tasks or self.tasks(ac), ac,
                       self.slots.mean(model, self.trained), bar)

    def fresh_base(self) -> torch.nn.Module:
        model = build_model(self.spec, self.cfg.model)
        model.load_state_dict(self.base_state)
        return model

    def adapt(self, ac: AdaptConfig, init: list[torch.Tensor] | None = None, bar=None,
              rows: tuple[Batch, Batch] | None = None) -> tuple[torch.nn.Module, dict]:
        """-> (the adapted model, a summary). `init`: a meta-learned initialisation already computed
        for this config's seed (meta only); `rows`: `self.rows(ac)` already read."""
        t0 = time.perf_counter()
        train, hold = rows or self.rows(ac)
        seconds = {}
        if ac.method == "scratch":
            torch.manual_seed(ac.seed)
            model = build_model(self.spec, self.cfg.model)
            attach_texts(model, PreparedTexts(self.prepare_dir, self.spec))
            params = [p for p in model.parameters() if p.requires_grad]
            init_test, extra = None, {}
            history = fit(model, params, as_scenario(train, self.target), as_scenario(hold, self.target), ac, bar)
        else:
            model = self.fresh_base()
            if ac.method == "meta":
                t1 = time.perf_counter()
                init = init if init is not None else self.meta_init(ac)
                seconds["meta"] = time.perf_counter() - t1
            else:
                init = self.slots.mean(model, self.trained)
            self.slots.set(model, self.target, init)
            init_test = scenario_metrics(model, self.prepare_dir, self.spec, self.target)
            extra = self.new_id_masks() if ac.new_ids else {}
            with self.slots.only(model, self.target, extra) as params:
                history = fit(model, params, train, hold, ac, bar)
        seconds["adapt"] = time.perf_counter() - t0 - seconds.get("meta", 0.0)
        test = scenario_metrics(model, self.prepare_dir, self.spec, self.target)
        best = next(h for h in history if h["kept"])
        summary = {"scenario": self.scenario, "method": ac.method, "k": ac.k, "seed": ac.seed,
                   "rows": {"fit": len(train), "held_back": len(hold)},
                   "best_step": best["step"], "steps": history[-1]["step"],
                   "test": test, "init_test": init_test, "seconds": seconds,
                   "changed_elements": changed_elements(self.base_state, model.state_dict()),
                   "scenario_elements": self.slots.numel(model) + self.extra_numel(model, extra),
                   "new_id_rows": self.new_id_rows if extra else {}, "history": history}
        return model, summary


class AdaptStage(Stage[AdaptResult]):
    """`mcl-ray adapt`: the adapted model in out_dir as a train folder (model.safetensors,
    config.json, history.json, adapt.json, metrics.json) that `export` packages like any other."""

    name = "adapt"
    uses_ray = False

    def __init__(self, train_dir: Path, prepare_dir: Path, out_dir: Path, scenario: str, ac: AdaptConfig,
                 force: bool = False, quiet: bool = False):
        self.adapter = a = Adapter(train_dir, prepare_dir, scenario)
        # the adapted model's config: this scenario is no longer held out (serving answers it)
        left = [n for n in a.cfg.train.holdout_scenarios if n != scenario]
        cfg = a.cfg.model_copy(update={"adapt": ac, "train": a.cfg.train.model_copy(update={"holdout_scenarios": left})})
        super().__init__(cfg, force, quiet)
        self.out_dir, self.ac = Path(out_dir), ac

    @property
    def marker(self) -> Marker:
        return Marker(self.out_dir / "fingerprint.json")

    def run_root(self) -> Path:
        return self.adapter.prepare_dir.parent

    def data_fingerprint(self) -> str:
        return self.adapter.spec.data_fingerprint

    def fingerprint(self) -> str:
        return fingerprint(self.adapter.spec.data_fingerprint, file_digest(self.adapter.train_dir / MODEL),
                           self.adapter.scenario, self.ac.model_dump(mode="json"))

    def load_cached(self) -> AdaptResult:
        return self._result(json.loads((self.out_dir / "adapt.json").read_text()), cached=True)

    def _result(self, s: dict, cached: bool = False) -> AdaptResult:
        return AdaptResult(self.out_dir, s["scenario"], s["method"], s["k"], s["rows"], s["test"], s["init_test"],
                           s["history"], s["seconds"], s["changed_elements"], cached)

    def compute(self, fp: str) -> AdaptResult:
        a, ac = self.adapter, self.ac
        if a.was_trained:
            self.say(f"[yellow]scenario {a.scenario!r} was trained on (it is not in train.holdout_scenarios): "
                     f"adapting replaces its parameters")
        train, hold = a.rows(ac)
        own = ""
        if ac.new_ids and ac.method != "scratch":
            a.new_id_masks()
            own = " and the rows of its own ids (" + ", ".join(f"{n} {c:,}" for n, c in a.new_id_rows.items() if c) + ")"
        self.say(f"[bold cyan]adapt[/] {a.cfg.model.backbone}: scenario {a.scenario!r} by {ac.method}, "
                 f"{len(train) + len(hold):,} labelled rows ({len(hold):,} held back for early stopping); "
                 + (f"{a.slots.numel(a.base):,} scenario parameters{own}, from {len(a.trained)} trained scenario(s)"
                    if ac.method != "scratch" else "a fresh model"))
        init, meta_s = None, 0.0
        if ac.method == "meta":
            t = time.perf_counter()
            with self.progress("meta-learning the initialisation", ac.meta_steps, "steps") as bar:
                init = a.meta_init(ac, bar=bar)
            meta_s = time.perf_counter() - t
        with self.progress(f"{ac.method} on {len(train):,} rows", ac.max_steps, "steps") as bar:
            model, summary = a.adapt(ac, init, bar, rows=(train, hold))
        if ac.method == "meta":
            summary["seconds"]["meta"] = meta_s
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_weights(model, self.out_dir / MODEL)
        (self.out_dir / "config.json").write_text(self.cfg.model_dump_json(indent=2))
        (self.out_dir / "history.json").write_text(json.dumps(summary["history"], indent=1))
        summary["base"] = {"train_dir": str(a.train_dir.resolve()), "weights": weights_digest(a.base)}
        (self.out_dir / "adapt.json").write_text(json.dumps(summary, indent=2))
        evaluate_train_dir(self.out_dir, a.prepare_dir)  # metrics.json: every scenario, as export expects
        return self._result(summary)
