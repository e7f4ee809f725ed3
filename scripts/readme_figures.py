"""Regenerate the README's measured figures from bench/results, so they cannot drift.

  python scripts/readme_figures.py           # rewrite the marked blocks of README.md
  python scripts/readme_figures.py --check   # exit 1 (with a diff) when README.md is out of date

A block is the text between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`; each NAME has a
renderer below that reads only bench/results/*.json (written by the benches in bench/)."""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BENCH = ROOT / "bench" / "accuracy_bench.py"
BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figures:(?P=name) -->)", re.S)


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


@functools.cache  # read once per render: several blocks use it
def _bench():
    """The accuracy bench as a module: its protocol constants and backbone names."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("accuracy_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _protocol() -> tuple[int, int]:
    """(epoch cap, history length) of the accuracy protocol, read from the bench that defines them."""
    mod = _bench()
    return mod.EPOCHS, mod.HISTORY_LEN


@functools.cache  # read once per render: several blocks use it
def _history_files() -> list[tuple[str, dict]]:
    """history.json (shared_bottom's variants) and history_<backbone>.json (another backbone's, one
    bench invocation each), in that order. They must share the protocol (epoch cap, history length,
    overrides), and a variant may be in one file only: the tables pair their runs by seed."""
    names = set(_bench().ORDER) - {"shared_bottom"}  # its variants are history.json's
    extra = [f for f in sorted(RESULTS.glob("history_*.json")) if f.stem[len("history_"):] in names]
    files = [("history.json", _load("history"))] + [(f.name, json.loads(f.read_text())) for f in extra]
    proto = lambda d: (d["epochs_cap"], d["history_length"], d.get("overrides", []))  # noqa: E731
    seen: dict[str, str] = {}
    for name, d in files:
        if proto(d) != proto(files[0][1]):
            raise SystemExit(f"{name}: epoch cap, history length or --set overrides {proto(d)} differ from "
                             f"history.json's {proto(files[0][1])}; its runs cannot share the history tables")
        for v in d["table"]:
            if v in seen:
                raise SystemExit(f"variant {v} is in both {seen[v]} and {name}; keep it in one file")
            seen[v] = name
    return files


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60))} s"


def default_run_output() -> str:
    """The console of the README's first command, abridged: progress (stderr), then the results
    (stdout) up to the first ranking rows."""
    d = _load("default_run")
    name = Path(d["command"].split()[-1]).stem  # the experiment: its default run_dir is runs/<name>

    def rel(line: str) -> str:
        return line.replace(d["run_dir"], f"runs/{name}")

    err, run = [], []  # per model trained (retrieval, then ranking): its first two and last two epochs
    for line in (rel(x) for x in d["stderr"] if x.strip()):
        if line.startswith("  epoch "):
            run.append(line)
            continue
        err += run if len(run) <= 4 else run[:2] + ["  ..."] + run[-2:]
        run = []
        err.append(line)
    err += run
    out, keep = [], True
    for line in map(rel, d["stdout"]):
        if keep and "(retrieval alone) metrics:" in line:  # the retrieval model's own tables: its summary line stays
            out.append("  ... (the retrieval model alone: AUC, top-K up to N, fairness tables)")
            keep = False
        if keep and line.lstrip().startswith("│ precision@10"):  # the rest of the ranking table
            out.append("  ...")
            keep = False
        if line.lstrip().startswith(("metrics:", "artifact:", "retrieval metrics:")) or "POST /v1/recommend" in line:
            keep = True
        if keep:
            out.append(line)
    return "```\n" + "\n".join(err) + "\n```\n\nand on stdout:\n\n```\n" + "\n".join(out) + "\n```\n"


def default_run_time() -> str:
    d = _load("default_run")
    return (f"Measured by `bench/default_run_bench.py` on {d['date']} ({d['machine']}): "
            f"{_mmss(d['wall_seconds'])} for `{d['command']}` from scratch (set-up not included), test AUC "
            f"{d['test_auc']:.4f} with `{d['backbone']}` (`bench/results/default_run.json`).\n")


def accuracy() -> str:
    acc_doc, abl_doc = _load("accuracy"), _load("text_ablation")
    acc, abl = acc_doc["table"], abl_doc["table"]
    best = max(abl, key=lambda k: abl[k]["auc"]["mean"])
    plain = best.split("+")[0]

    def f(row):
        return f"{row['auc']['mean']:.4f} ± {row['auc']['std']:.4f} over {row['seeds']} seeds"

    best_id = max(acc, key=lambda k: acc[k]["auc"]["mean"])
    lines = [f"On ML-1M under the SWR protocol the best configuration here is `{plain}` with the MiniLM text",
             f"features (test AUC {f(abl[best])}; without them {f(abl[plain])} in the same file,",
             f"`bench/results/text_ablation.json`, {abl_doc['epochs_cap']}-epoch cap); `bench/results/accuracy.json` "
             f"has every backbone without text ({acc_doc['epochs_cap']}-epoch cap; best: `{best_id}`, {f(acc[best_id])})."]
    if "shared_bottom+text" in abl:
        lines.append(f"The default trains `shared_bottom` with text features ({f(abl['shared_bottom+text'])}), "
                     f"several times faster per epoch. `--set model.backbone={plain}` switches.")
    return "\n".join(lines) + "\n"


def tune() -> str:
    d = _load("tune")
    a, fi = d["sweeps"]["asha"], d["sweeps"]["fifo"]
    w = a["winner"]
    params = ", ".join(f"{k.split('.')[-1]} {v:.2g}" if isinstance(v, float) else f"{k.split('.')[-1]} {v}"
                       for k, v in w["params"].items() if k != "model.dropout")
    return (f"Measured here (`bench/tune_bench.py`, 2 cores, {d['samples']} trials capped at {d['epoch_cap']} epochs): "
            f"ASHA {a['fit_seconds'] / 60:.1f} min ({a['trials_per_hour']:.0f} trials/h, {a['epochs']} epochs) vs FIFO "
            f"{fi['fit_seconds'] / 60:.1f} min ({fi['trials_per_hour']:.0f} trials/h, {fi['epochs']} epochs), "
            f"{fi['fit_seconds'] / a['fit_seconds']:.2f}x; the ASHA winner ({params}) reached test AUC "
            f"{a['winner_test']['overall']['auc']:.4f} against {d['default_test']['overall']['auc']:.4f} for the default "
            f"configuration under the same cap (`bench/results/tune.json`).\n")


def serve() -> str:
    d = _load("serve")
    levels = sorted(d["serve"], key=int)
    rps = " / ".join(f"{d['serve'][k]['rps']:.0f}" for k in levels)
    p99 = " / ".join(f"{d['serve'][k]['p99_ms']:.0f}" for k in levels)
    bare = " / ".join(f"{d['bare'][k]['rps']:.0f}" for k in levels)
    ratios = [d["serve"][k]["rps"] / d["bare"][k]["rps"] for k in levels]
    errors = sum(n for lv in ("serve", "bare") for k in levels for c, n in d[lv][k]["codes"].items() if c != "200")
    return (f"Measured here (`bench/serve_bench.py`, 1 model replica, {d['requests_per_level']} requests per level): "
            f"Serve reached {rps} req/s at {' / '.join(levels)} in flight (p99 {p99} ms), a bare FastAPI app with "
            f"the same function {bare} req/s ({min(ratios):.2f}-{max(ratios):.2f}x), with {errors} errors "
            f"(`bench/results/serve.json`).\n")


def serve_two_stage() -> str:
    """Two-stage artifacts over HTTP: Serve, bare FastAPI and a no-op Serve app, per in-flight level."""
    out = []
    for name, label in (("serve_two_stage_ml1m", "ML-1M"), ("serve_two_stage_1m", "synthetic, 1M items")):
        try:
            d = _load(name)
        except FileNotFoundError:
            continue
        rows = ["| in flight | Serve p50 / p99 ms | Serve req/s | bare FastAPI req/s | no-op Serve p99 ms | no-op Serve req/s "
                "| Serve / no-op |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for k in sorted(d["serve"], key=int):
            s_, b, n = d["serve"][k], d["bare"][k], d["noop"][k]
            rows.append(f"| {k} | {s_['p50_ms']:.1f} / {s_['p99_ms']:.1f} | {s_['rps']:.0f} | {b['rps']:.0f} | "
                        f"{n['p99_ms']:.1f} | {n['rps']:.0f} | {s_['rps'] / n['rps']:.2f}x |")
        errors = sum(c_n for lv in ("serve", "bare", "noop") for k in d[lv] for c, c_n in d[lv][k]["codes"].items()
                     if c != "200")
        out.append(f"{label} (`bench/results/{name}.json`, {d['requests_per_level']} requests per level, "
                   f"model replica {d['model_replica_rss_mib']:,.0f} MiB RSS, {errors} non-200 answers):\n\n"
                   + "\n".join(rows) + "\n")
    return "\n".join(out)


def serve_options() -> str:
    """Ray Serve's throughput options, with and without, from one run (median over rounds)."""
    d = _load("serve_options")
    levels = sorted(next(iter(d["median"].values())), key=int)
    rows = ["| variant | environment | " + " | ".join(f"{c} in flight: p50 / p99 ms, req/s" for c in levels)
            + " | non-200 |", "|---|---|" + "---:|" * (len(levels) + 1)]
    for v, env in d["variants"].items():
        m = d["median"][v]
        envs = ", ".join(f"`{k}={x}`" for k, x in env.items()) or "Ray's defaults"
        rows.append(f"| {v} | {envs} | " + " | ".join(f"{m[c]['p50_ms']:.1f} / {m[c]['p99_ms']:.1f}, {m[c]['rps']:.0f}"
                                                      for c in levels) + f" | {d['errors'][v]} |")
    return (f"Measured by `bench/serve_options_bench.py` on {d['date']} ({d['machine']}; "
            f"`bench/results/serve_options.json`): the two-stage ML-1M artifact, 1 model replica, "
            f"{d['requests_per_level']} requests per level, median of {d['rounds']} rounds run in alternating order:\n\n"
            + "\n".join(rows) + "\n")


def autoscale() -> str:
    """The autoscaling ramp: per phase, throughput, p99 and replicas."""
    d = _load("autoscale")
    rows = ["| seconds | in flight | req/s | p99 ms | running model replicas (start / max / end) |",
            "|---|---:|---:|---:|---|"]
    for p in d["by_phase"]:
        rows.append(f"| {p['from_s']:.0f}-{p['to_s']:.0f} | {p['in_flight']} | {p['rps']:.0f} | {p['p99_ms']} | "
                    f"{p['replicas_start']} / {p['replicas_max']} / {p['replicas_end']} |")
    return (f"Measured by `bench/autoscale_bench.py` on {d['date']} ({d['machine']}; head node told "
            f"{d['num_cpus_logical']} logical CPUs; `bench/results/autoscale.json`, plot "
            f"`bench/results/autoscale.png`): {d['requests']:,} requests, {d['errors']} non-200, at most "
            f"{d['max_running_replicas']} running model replicas.\n\n" + "\n".join(rows) + "\n")


def explain() -> str:
    """Explanation latency without and with the sentence."""
    d = _load("explain")
    w = d["without_sentence"]
    rows = ["| what | requests | p50 ms | p99 ms | generator load |", "|---|---:|---:|---:|---:|",
            f"| attributions ({d['ig_steps']} IG steps) + history evidence | {w['n']} | {w['p50_ms']:.1f} | "
            f"{w['p99_ms']:.1f} | |"]
    for b, r in d["with_sentence"].items():
        if isinstance(r, dict):
            rows.append(f"| + sentence, {b} backend | {r['n']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                        f"{r['load_s']:.1f} s |")
        else:
            rows.append(f"| + sentence, {b} backend | {r} | | | |")
    sample = next((r["samples"][0] for r in d["with_sentence"].values() if isinstance(r, dict) and r["samples"]), None)
    text = (f"Measured by `bench/explain_bench.py` on {d['date']} ({d['machine']}, one torch thread, in process; "
            f"`bench/results/explain.json`); the median integration error |delta| / |logit - baseline logit| "
            f"was {d['relative_convergence_delta_median']:.4f}:\n\n" + "\n".join(rows) + "\n")
    if sample:
        text += ("\nA sample: facts given to the generator\n\n" + "\n".join(f"> - {x}" for x in sample["facts"])
                 + f"\n\nand what it wrote: \"{sample['sentence']}\"\n")
    return text


def fairness() -> str:
    """The default run's fairness tables (test split), as `mcl-ray run` writes them in report.md."""
    sys.path.insert(0, str(ROOT))
    from mcl_ray.evaluate.summary import fairness_markdown

    d = _load("default_run")
    return (f"The default run (`{d['command']}`, {d['date']}, `bench/results/default_run.json`), test split:\n\n"
            + "\n".join(fairness_markdown(d["fairness"])))


def scale() -> str:
    """Per size: wall per stage, peak RSS of any process, cost per row; stream vs memory."""
    d = _load("scale")
    stages = ["prepare", "train", "evaluate", "export", "serve"]
    rows = ["| interactions (users / items) | " + " | ".join(stages) + " | µs per row | largest process | test AUC |",
            "|---|" + "---:|" * (len(stages) + 3)]
    for r in d["sizes"]:
        st = r["stages"]
        cells = [f"{st[s]['seconds']:.0f} s" for s in stages]
        cells[1] += f" ({st['train'].get('data_mode', 'memory')}, {st['train']['samples_per_s']:,} samples/s)"
        biggest = max(st.values(), key=lambda x: x["max_process_rss_mib"])["max_process_rss_mib"]
        rows.append(f"| {r['rows']:,} ({r['users']:,} / {r['items']:,}) | " + " | ".join(cells)
                    + f" | {r['seconds_total'] / r['rows'] * 1e6:.0f} | {biggest / 1024:.1f} GiB | {r['test_auc']:.3f} |")
    five = next((r for r in d["sizes"] if "stream_train" in r), None)
    tail = ""
    if five:
        tail = (f"\nAt {five['rows']:,} rows, the same cluster side by side: stream mode trained at "
                f"{five['stream_train']['samples_per_s']:,} samples/s, memory mode at "
                f"{five['stages']['train']['samples_per_s']:,} ({five['stream_vs_memory_samples_per_s']:.2f}x).\n")
    return (f"Measured by `bench/scale_bench.py` on {d['summary']['date']} ({d['summary']['machine']}, one local "
            "Ray cluster, 1 training worker, 1 epoch, text features off; `bench/results/scale.json`):\n\n"
            + "\n".join(rows) + "\n" + tail)


def two_stage() -> str:
    """Two-stage serving: quality against ranking every item (ML-1M), latency (ML-1M, 1M items)."""
    d = _load("two_stage")
    m = d["ml1m"]
    n = m["candidates"]
    rows = ["| scenario | NDCG@10, all items ranked | NDCG@10, two-stage | ratio | retrieval alone: Recall@" + f"{n} |",
            "|---|---:|---:|---:|---:|"]
    for name, q in m["by_scenario"].items():
        rows.append(f"| {name} | {q['full_ndcg@10']:.4f} | {q['two_stage_ndcg@10']:.4f} | {q['ratio_ndcg@10']:.2f} "
                    f"| {q[f'retrieval_recall@{n}']:.3f} |")
    lat = ["| data | catalogue | index | two-stage p50 / p99 | stages (p50) | all items ranked p50 / p99 |",
           "|---|---:|---|---:|---|---:|"]
    # the catalogue: items with a trained id (synthetic: 2M interactions leave about half of 1M items unseen)
    for label, part in (("ML-1M", m), ("synthetic, 1,000,000 items, 2M interactions", d.get("items_1m"))):
        if not part:
            continue
        x = part["latency"]
        st = ", ".join(f"{k} {v:.2f}" for k, v in x["two_stage"]["stage_p50_ms"].items())
        lat.append(f"| {label} | {x['items']:,} | {x['index']} | {x['two_stage']['p50_ms']:.1f} / "
                   f"{x['two_stage']['p99_ms']:.1f} ms | {st} ms | {x['full_catalogue']['p50_ms']:.1f} / "
                   f"{x['full_catalogue']['p99_ms']:.1f} ms |")
    return (f"Measured by `bench/two_stage_bench.py` on {d['date']} ({d['machine']}; `bench/results/two_stage.json`). "
            f"ML-1M, SWR protocol, text features off, both models capped at {m['epochs_cap']} epochs, one seed, "
            f"retrieve {n}; the same sampled test users in both columns:\n\n" + "\n".join(rows)
            + f"\n\nServing core in-process, one request at a time on one thread (k=10, exclude seen; "
            f"{d['requests']} requests, fewer for the 1M-item full ranking):\n\n" + "\n".join(lat) + "\n")


def adaptation() -> str:
    """A held-out SWR scenario added from k rows: test AUC per method and k, mean +- std over seeds."""
    d = _load("adaptation")
    pm = lambda x: f"{x['mean']:.4f} ± {x['std']:.4f}"  # noqa: E731
    cell = {(r["method"], r["k"]): r for r in d["table"]}
    methods = ("finetune", "meta", "scratch", "finetune-tower")
    rows = ["| k rows | finetune | meta | scratch | finetune, tower only | finetune start | meta start |",
            "|---:|" + "---:|" * (len(methods) + 2)]
    for k in d["ks"]:
        rows.append(f"| {k:,} | " + " | ".join(pm(cell[m, k]["test_auc"]) for m in methods)
                    + f" | {pm(cell['finetune', k]['start_auc'])} | {pm(cell['meta', k]['start_auc'])} |")
    held = d["held_out"]
    untrained = [b["test_auc_by_scenario"][held] for b in d["base"]]
    others = sorted({n for b in d["base"] for n in b["test_auc_by_scenario"] if n != held})
    other = ", ".join(f"{n} {sum(b['test_auc_by_scenario'][n] for b in d['base']) / len(d['base']):.4f}"
                      for n in others)
    meta_s = cell["meta", d["ks"][0]]["meta_seconds"]["mean"]
    return (f"Measured by `bench/adapt_bench.py` on {d['when']} (2 cores; `bench/results/adaptation.json`): ML-1M, "
            f"SWR features, `shared_bottom`, `{held}` held out of training, {d['seeds']} seeds, test AUC on all of "
            f"its test rows. finetune and meta also train the rows of ids no trained scenario uses (`adapt.new_ids`, "
            f"the age group's own users); \"tower only\" is finetune without them. \"start\" is the initialisation "
            f"before any step. The base models' test AUC on the "
            f"trained scenarios: {other}; on `{held}` with its own parameters untrained: "
            f"{sum(untrained) / len(untrained):.4f}. Meta-learning took {meta_s:.0f} s per seed.\n\n"
            + "\n".join(rows) + "\n")


def perturbation() -> str:
    """Embedding perturbation in training: clean and corrupted-input test AUC, per results file
    (each file holds its own baseline row, run by the same script version)."""
    rows = ["| variant | test AUC | AUC, 20 % of test ids corrupted | results file |", "|---|---:|---:|---|"]
    caps = set()
    for name in ("perturbation", "perturbation_pgd"):
        d = _load(name)
        caps.add(d["epochs_cap"])
        for v, t in d["table"].items():
            rows.append(f"| {v} | {t['auc']['mean']:.4f} ± {t['auc']['std']:.4f} | {t['auc_corrupted']['mean']:.4f} ± "
                        f"{t['auc_corrupted']['std']:.4f} | `{name}.json` |")
    return (f"Measured by `bench/accuracy_bench.py` (ML-1M, SWR, `shared_bottom`, {'/'.join(map(str, sorted(caps)))}-epoch "
            f"cap, 3 seeds, eps 0.05; pgd: 3 steps):\n\n" + "\n".join(rows) + "\n")


BEST_PUBLISHED = {"overall": 0.8115, "s0_age_under25": 0.8137, "s1_age_25_34": 0.8187, "s2_age_35plus": 0.8057}


def history() -> str:
    """Behaviour history and text per backbone: the SWR feature set and the +history set in two
    tables, each variant's validation and test AUC, and each addition's per-seed paired delta."""
    import statistics

    files = _history_files()
    d = files[0][1]  # shared_bottom's file: the reference, the profile stats, the protocol
    t = {v: x for _, f in files for v, x in f["table"].items()}
    runs = [r for _, f in files for r in f["runs"] if "error" not in r]
    test = {(r["backbone"], r["seed"]): r["auc"] for r in runs}

    def delta(a: str, b: str) -> str:  # b - a, paired by seed
        xs = [test[(b, s)] - test[(a, s)] for (v, s) in test if v == a and (b, s) in test]
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.fmean(xs):+.4f} ± {sd:.4f}" if xs else "-"

    def ms(x: dict) -> str:
        return f"{x['mean']:.4f} ± {x['std']:.4f}"

    base = next(v for v in d["table"] if "+" not in v)
    scen = list(t[base]["by_scenario"])
    head = ("| variant | valid AUC | test AUC | " + " | ".join(scen) + " | Δ test AUC (paired) | epoch (s) |\n"
            "|---|---:|---:|" + "---:|" * len(scen) + "---|---:|")
    secs = {v: statistics.median(r["epoch_seconds"] for r in runs if r["backbone"] == v) for v in t}

    def row(v: str, ref: str | None, what: str) -> str:
        x = t[v]
        cells = " | ".join(f"{x['by_scenario'][s]['auc']['mean']:.4f}" for s in scen)
        seeds = f" ({x['seeds']} seed{'s' * (x['seeds'] > 1)})" if x["seeds"] < 3 else ""
        against = ("(reference)" if ref is None else f"{delta(ref, v)} {what}" if ref in t
                   else f"- (no `{ref}` run yet)")
        return f"| `{v}`{seeds} | {ms(x['val_auc'])} | {ms(x['auc'])} | {cells} | {against} | {secs[v]:.0f} |"

    backbones = list(dict.fromkeys(v.split("+")[0] for v in t))  # shared_bottom first, then file order
    swr, hist, over = [], [], []
    for b in backbones:
        swr += [row(v, ref, what) for v, ref, what in ((b, None, ""), (f"{b}+text", b, "text")) if v in t]
        hist += [row(v, ref, what) for v, ref, what in (
            (f"{b}+hist", b, "history"), (f"{b}+hist+text", f"{b}+hist", "text on top of history"),
            (f"{b}+hist+text+profile", f"{b}+hist+text", "LLM profiles on top")) if v in t]
        if f"{b}+hist+text" in t and f"{b}+text" in t:
            over.append(f"`{b}` {delta(f'{b}+text', f'{b}+hist+text')}")
    if over:
        hist.append("\nHistory on top of text, Δ test AUC (`+hist+text` against `+text`, paired by seed): "
                    + ", ".join(over) + ".")
    if "profile" in d:  # the profile stage's own timing, every user with train rows
        p = d["profile"]
        hist.append(f"\nThe profiles: {p['users']:,} users written by {p['generator']['model']} "
                    f"({p['generator']['backend']} on this CPU, at most {p['generator']['max_new_tokens']} tokens each) "
                    f"in {p['seconds'] / 60:.0f} min ({p['users_per_s']:.2f} users/s, {p['tokens_per_s']:.0f} "
                    f"generated tokens/s), run once alone and reused by the bench.")
    if (RESULTS / "history_pooling.json").exists():
        hp = _load("history_pooling")
        m = hp["ms_per_step_median"]
        hist.append(f"\nWhat the history fields cost (`bench/history_pooling_bench.py`, one training step of "
                    f"`shared_bottom` on ML-1M-sized random ids, batch {hp['batch']}, 1 thread, medians of "
                    f"{hp['rounds']} rounds side by side): none {m['none']:.0f} ms, mean {m['mean']:.0f} ms, DIN "
                    f"{m['din']:.0f} ms (factored; {m['din_plain']:.0f} ms applied to the [B, L, 4D] input as written, "
                    f"x{hp['din_factored_over_plain']:.2f}), DIN + mean {m['din+mean']:.0f} ms "
                    f"(x{hp['din_mean_over_none']:.1f} of none).")
    best = max((v for v in t if t[v]["seeds"] >= 3), key=lambda v: t[v]["val_auc"]["mean"])  # full rows only
    pub = ", ".join(f"{k} {v:.4f}" for k, v in BEST_PUBLISHED.items())
    others = files[1:]
    more = ""
    if others:
        more = (" The other backbones ran later, one invocation each with the same prepare config (" + ", ".join(
            f"`{name}`" + (f", {f['pending_jobs']} runs unfinished" if f.get("pending_jobs") else "")
            for name, f in others) + "); their epoch times are medians of two jobs side by side.")
    return (f"ML-1M, SWR protocol, {d['epochs_cap']}-epoch cap with patience 4, seeds 2024-2026, every run of a "
            f"backbone trained on the same prepared rows (history length {d['history_length']}); test reported once, "
            f"the choice made on validation AUC (`bench/results/history.json` for `{base}`, "
            f"`bench/accuracy_bench.py`). "
            f"Epoch times are medians with two jobs side by side on 2 cores; test runs shared the machine during "
            f"part of the `{base}+hist` trainings, which inflates their times (one +hist run alone: about 33 s an "
            f"epoch)."
            + (" The `+profile` rows were trained in a later invocation (`--resume`), after DIN's first layer was "
               "factored (the same function, faster: below), two seeds side by side and the third beside test runs, "
               "so their epoch times are not comparable with the earlier +hist rows." if "profile" in d else "")
            + more + "\n\n"
            f"The SWR feature set:\n\n{head}\n" + "\n".join(swr) + "\n\n"
            f"With behaviour history (another feature set: not comparable with published SWR numbers as like for "
            f"like):\n\n{head}\n" + "\n".join(hist) + "\n\n"
            f"Best on validation (of the rows with 3 seeds): `{best}` (test AUC {ms(t[best]['auc'])}). "
            f"Best published SWR numbers, per "
            f"scenario the best of any backbone: {pub}.\n")


def history_levers() -> str:
    """Settings tried for the +history rows, each variant against its own reference run of the same
    seeds (history.json, history_<backbone>.json), compared on validation AUC; one results file per setting. A
    file with several variants also gives what each LLM part adds at its settings, paired by seed."""
    import statistics

    ref = {(r["backbone"], r["seed"]): r for _, f in _history_files() for r in f["runs"] if "error" not in r}
    sd = lambda xs: f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else ""  # noqa: E731

    def deltas(pairs) -> str:
        """(before, after) runs paired by seed -> "Δ valid m ± s, Δ test m ± s"."""
        dv = [q["val_auc"] - p["val_auc"] for p, q in pairs]
        dt = [q["auc"] - p["auc"] for p, q in pairs]
        return f"Δ valid {statistics.fmean(dv):+.4f}{sd(dv)}, Δ test {statistics.fmean(dt):+.4f}{sd(dt)}"
    epochs, length = _protocol()
    files = [(f, json.loads(f.read_text())) for f in sorted(RESULTS.glob("history_lever_*.json"))]
    setting = lambda d: ", ".join([  # noqa: E731
        *([f"prepare.history.length={d['history_length']}"] if d["history_length"] != length else []),
        *([f"epoch cap {d['epochs_cap']}"] if d["epochs_cap"] != epochs else []),
        *d.get("overrides", [])]) or "(reference settings)"
    # shared_bottom's runs per setting: the other backbones are compared with them, paired by seed
    sb = {(setting(d), r["backbone"], r["seed"]): r for _, d in files for r in d["runs"]
          if "error" not in r and r["backbone"].startswith("shared_bottom+")}
    rows, full = [], []
    for f, d in files:
        what = setting(d)
        done = {(r["backbone"], r["seed"]): r for r in d["runs"] if "error" not in r}
        for v in d["table"]:
            rs = [r for (b, s), r in sorted(done.items()) if b == v]
            if not rs:
                continue
            paired = [r for r in rs if (v, r["seed"]) in ref]  # the seeds the reference has run
            if paired:
                dv = [r["val_auc"] - ref[(v, r["seed"])]["val_auc"] for r in paired]
                dt = [r["auc"] - ref[(v, r["seed"])]["auc"] for r in paired]
                n = f" ({len(paired)} of {len(rs)} seeds)" if len(paired) < len(rs) else ""
                dvs = f"{statistics.fmean(dv):+.4f}{sd(dv)}{n}"
                dts = f"{statistics.fmean(dt):+.4f}{sd(dt)}{n}"
            else:  # no reference run of this variant at the protocol's settings: nothing to compare with
                dvs = dts = "(no reference run)"
            seeds = ", ".join(str(r["seed"]) for r in rs) + (" (run not finished)" if d.get("pending_jobs") else "")
            rows.append(f"| `{what}` | `{v}` | {seeds} | "
                        f"{statistics.fmean(r['val_auc'] for r in rs):.4f} | {dvs} | "
                        f"{statistics.fmean(r['auc'] for r in rs):.4f} | {dts} | "
                        f"{', '.join(str(r['best_epoch']) for r in rs)} | `{f.name}` |")
            base = "shared_bottom" + v[v.index("+"):] if "+" in v else None
            pairs = [(sb[(what, base, r["seed"])], r) for r in rs if (what, base, r["seed"]) in sb]
            if base and base != v and pairs:
                n = f"{len(pairs)} seed" + "s" * (len(pairs) > 1)
                full.append(f"`{v}` against `{base}` at `{what}` (paired by seed, {n}): {deltas(pairs)}.")
            # a setting on top of another file's (its overrides extended): paired against that one on 3+ seeds
            under = max((e for _, e in files if 0 < len(e.get("overrides", [])) < len(d.get("overrides", []))
                         and d["overrides"][:len(e["overrides"])] == e["overrides"]),
                        key=lambda e: len(e["overrides"]), default=None)
            if under is not None:
                prev = {(r["backbone"], r["seed"]): r for r in under["runs"] if "error" not in r}
                pairs = [(prev[(v, r["seed"])], r) for r in rs if (v, r["seed"]) in prev]
                if len(pairs) >= 3:
                    full.append(f"`{what}`, `{v}` against `{setting(under)}` (paired by seed, {len(pairs)} seeds): "
                                f"{deltas(pairs)}.")
            if len(rs) >= 3 and v.endswith("+hist+text"):  # a confirmed setting: test AUC per scenario
                x = d["table"][v]
                full.append(f"`{what}`, `{v}`, test AUC per scenario (mean ± std over {len(rs)} seeds; best published "
                            "in brackets): " + ", ".join(f"{sc} {m['auc']['mean']:.4f} ± {m['auc']['std']:.4f} "
                                                        f"[{BEST_PUBLISHED[sc]:.4f}]" for sc, m in x["by_scenario"].items())
                            + f"; overall {x['auc']['mean']:.4f} ± {x['auc']['std']:.4f} "
                            f"[{BEST_PUBLISHED['overall']:.4f}].")
        parts = []  # each LLM part at these settings: the variant with it against the one without, same seeds
        for a, b, part in (("+hist", "+hist+text", "text"), ("+hist+text", "+hist+text+profile", "LLM profiles")):
            pairs = [(r, done[(v[: -len(a)] + b, s)]) for (v, s), r in done.items()
                     if v.endswith(a) and (v[: -len(a)] + b, s) in done]
            if len(pairs) >= 2:
                parts.append(f"{part} {deltas(pairs)} ({len(pairs)} seeds)")
        if parts:
            full.append(f"What the LLM parts add at `{what}` (`{f.name}`, paired by seed): " + "; ".join(parts) + ".")
    return ("The protocol above with the settings named changed (`bench/accuracy_bench.py --set` / "
            "`--history-length`); Δ against the reference run of the same variant and seed in "
            "`bench/results/history.json` (or the backbone's `history_<backbone>.json`); a setting is kept only if "
            "validation says so:\n\n"
            "| setting | variant | seeds | valid AUC | Δ valid | test AUC | Δ test | best epoch | results |\n"
            "|---|---|---|---:|---:|---:|---:|---|---|\n" + "\n".join(rows) + "\n"
            + "".join(f"\n{line}\n" for line in full))


def llm_parts() -> str:
    """The profile stage's time and the augment answers' position bias (bench/llm_parts_bench.py)."""
    d = _load("llm_parts")
    p, a = d["profile"], d["augment"]
    full = (f"; at that rate all {p['all_users']:,} users with train rows would take about "
            f"{p['all_users_seconds_extrapolated'] / 60:.0f} min (an upper bound: the start-up counts once)" if "all_users" in p else "")
    letters = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])) or "none"  # noqa: E731
    return (f"Measured by `bench/llm_parts_bench.py` ({d['model']}, {d['backend']} on this CPU, run alone): "
            f"profiling {p['users']:,} users took {p['seconds']:.0f} s including the engine's start-up "
            f"({p['users_per_s']:.2f} users/s, {p['tokens_per_s']:.0f} generated tokens/s, "
            f"{p['generated_tokens'] / p['users']:.1f} tokens per profile against a cap of {p['max_new_tokens']}){full}. "
            f"A profile it wrote: \"{p['examples'][0]['profile']}\"\n\n"
            f"Position bias, {a['groups']} thin users asked {a['permutations']} times each ({a['requested']} prompts, "
            f"{a['valid']} valid answers): the liked letter was {letters(a['answer_letters']['like'])}; the disliked "
            f"letter {letters(a['answer_letters']['dislike'])}. Picks kept by the consistency rule: {a['picks']} "
            f"({a['rows_written']} synthetic rows).\n")


def augment_sparse() -> str:
    """Debiased (pointwise) augmentation on a sparsified ML-1M split (bench/augment_sparse_bench.py)."""
    d = _load("augment_sparse")
    pr, cut, dist, aug = d["protocol"], d["sparse_split"], d["answer_distribution"], d["augment"]
    agree = d["pick_agreement"]
    letters = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"  # noqa: E731
    ch, pw = dist["choice"], dist["pointwise"]
    lo, hi = pr["keep_per_user"]
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731

    def agreed(w: str) -> str:
        a = agree[w]
        return (f"{a['held_back']} of the {a['picks']} {w} picks are rows the cut held back, "
                f"{pct(a['agree'])} of them with the same label")

    rows = []
    for v, t in d["table"].items():
        dl, dv = t.get("delta_auc"), t.get("delta_val_auc")
        rows.append(f"| `{v}` | {t['val_auc']['mean']:.4f} ± {t['val_auc']['std']:.4f} | "
                    f"{t['auc']['mean']:.4f} ± {t['auc']['std']:.4f} | "
                    + (f"{dv['mean']:+.4f} ± {dv['std']:.4f} | {dl['mean']:+.4f} ± {dl['std']:.4f} |" if dl
                       else "(reference) | (reference) |"))
    g = pr["generator"]
    if ch:  # the lettered prompt on the same users
        before = (f"- Answers before debiasing (lettered prompt, the same {ch['requested']} users): liked letter "
                  f"{letters(ch['answer_letters']['like'])}; disliked {letters(ch['answer_letters']['dislike'])}.\n")
    else:  # not re-asked here: the lettered prompt's measurement on the full split (llm_parts_bench)
        lp = _load("llm_parts")["augment"]
        before = (f"- Answers before debiasing (lettered prompt, measured on the full split by "
                  f"`bench/llm_parts_bench.py`, {lp['requested']} answers): liked letter "
                  f"{letters(lp['answer_letters']['like'])}; disliked {letters(lp['answer_letters']['dislike'])}.\n")
    return (f"Sparse regime (`bench/augment_sparse_bench.py`, `bench/results/augment_sparse.json`): ML-1M's "
            f"training split cut to a seeded {lo}-{hi} rows per user ({cut['train_rows_sparse']:,} of "
            f"{cut['train_rows_full']:,} rows; validation and test unchanged), {pr['features']}, `{pr['backbone']}`, "
            f"{pr['epochs_cap']}-epoch cap, seeds 2024-{2023 + pr['seeds']}, {g['model']} via {g['backend']} on this "
            f"CPU.\n\n"
            + before
            + f"- After (pointwise, {aug['users']} users, {pw['requested']} prompts): the liked pick's place in the "
            f"shown order {letters(pw['answer_letters']['like'])}; the disliked pick's "
            f"{letters(pw['answer_letters']['dislike'])}; {pw['ties']} users tied.\n"
            f"- Augmentation (the pointwise answers): {aug['users']} users x {aug['candidates']} candidates "
            f"({aug['candidates'] - aug['random_candidates']} popular in the user's scenario, "
            f"{aug['random_candidates']} random), {aug['requested']:,} prompts in "
            f"{aug['generation_seconds'] / 60:.0f} min ({aug['prompts_per_s']:.1f} prompts/s), "
            f"{aug['rows_written']:,} synthetic rows. Liked picks were popular candidates "
            f"{aug['picked_popular']['like']} times of {aug['picks'] // 2}, disliked picks "
            f"{aug['picked_popular']['dislike']} times.\n"
            f"- Are the picks right? The cut held back real rows with known labels "
            f"({pct(agree['held_back_positive_rate'])} positive): {agreed('like')}; {agreed('dislike')}.\n\n"
            f"| variant | valid AUC | test AUC | Δ valid (paired) | Δ test (paired) |\n|---|---:|---:|---:|---:|\n"
            + "\n".join(rows) + f"\n\n`+denoise`: LLMRec's pruning, the {pr['denoise_share']:.0%} highest-loss "
            f"synthetic rows of each batch get weight 0.\n")


def stream_vs_memory() -> str:
    d = _load("stream_vs_memory")
    t = d["table"]
    mem, st = t["shared_bottom"]["auc"], t["shared_bottom+stream"]["auc"]
    return (f"On ML-1M (SWR protocol, shared_bottom, {t['shared_bottom']['seeds']} seeds each, up to "
            f"{d['epochs_cap']} epochs, `bench/accuracy_bench.py`): test AUC {mem['mean']:.4f} ± {mem['std']:.4f} "
            f"in memory mode, {st['mean']:.4f} ± {st['std']:.4f} streamed (`bench/results/stream_vs_memory.json`).\n")


RENDERERS = {"default-run-output": default_run_output, "default-run-time": default_run_time,
             "accuracy": accuracy, "tune": tune, "serve": serve, "scale": scale, "fairness": fairness,
             "two-stage": two_stage, "serve-two-stage": serve_two_stage, "serve-options": serve_options,
             "autoscale": autoscale, "explain": explain, "adaptation": adaptation,
             "perturbation": perturbation, "history": history, "history-levers": history_levers,
             "llm-parts": llm_parts, "augment-sparse": augment_sparse,
             "stream-vs-memory": stream_vs_memory}


def render(text: str) -> str:
    def sub(m: re.Match) -> str:
        name = m["name"]
        if name not in RENDERERS:
            raise SystemExit(f"README.md: unknown figures block {name!r} (known: {', '.join(RENDERERS)})")
        return m.group(1) + RENDERERS[name]() + m.group(4)
    return BLOCK.sub(sub, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="Only compare; exit 1 when README.md is out of date.")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    a = ap.parse_args()
    path = Path(a.readme)
    old = path.read_text()
    new = render(old)
    if a.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "README.md",
                                                       "README.md (from bench/results)"))
            sys.exit("README.md figures are out of date: run `python scripts/readme_figures.py`")
        print(f"README.md figures match bench/results ({len(BLOCK.findall(old))} blocks)")
        return
    path.write_text(new)
    print(f"README.md: {len(BLOCK.findall(new))} blocks regenerated from bench/results")


if __name__ == "__main__":
    main()
