"""PNG plots of a run: learning curves and per-scenario test AUC."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(train_dir: Path, metrics: dict) -> list[Path]:
    written = []
    hist_file = train_dir / "history.json"
    if hist_file.exists():
        hist = json.loads(hist_file.read_text())
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        ep = [h["epoch"] + 1 for h in hist]
        ax[0].plot(ep, [h["train_loss"] for h in hist], marker="o")
        ax[0].set(title="train loss", xlabel="epoch")
        ax[1].plot(ep, [h["val_auc"] for h in hist], marker="o", label="overall")
        for k in hist[0]:
            if k.startswith("val_auc/"):
                ax[1].plot(ep, [h[k] for h in hist], linestyle="--", label=k.split("/", 1)[1])
        ax[1].set(title="validation AUC", xlabel="epoch")
        ax[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(train_dir / "learning_curves.png", dpi=100)
        plt.close(fig)
        written.append(train_dir / "learning_curves.png")
    # A scenario whose split holds one label only has no AUC (NaN): its bar is left out, named n/a.
    names = list(metrics["by_scenario"]) + ["overall"]
    vals = [metrics["by_scenario"][n]["auc"] for n in names[:-1]] + [metrics["overall"]["auc"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 3.5))
    shown = [v for v in vals if v == v]
    ax.bar(names, [v if v == v else 0.0 for v in vals], color=["C0"] * (len(names) - 1) + ["C1"])
    if shown:
        ax.set_ylim(min(shown) - 0.02, max(shown) + 0.01)
    ax.set(title=f"{metrics['split']} AUC by scenario ({metrics['backbone']})")
    for i, v in enumerate(vals):
        ax.text(i, v if v == v else (min(shown) if shown else 0.0), f"{v:.4f}" if v == v else "n/a",
                ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    name = "scenario_auc.png" if metrics["split"] == "test" else f"scenario_auc_{metrics['split']}.png"
    fig.savefig(train_dir / name, dpi=100)
    plt.close(fig)
    written.append(train_dir / name)
    return written
