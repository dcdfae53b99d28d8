"""The report's plots (matplotlib, Agg backend, no display) and images, as PNG bytes.

Each function takes the measurements of trainers.judge.report_measure and returns the PNG
bytes of one figure, or None when there is nothing to draw; the page embeds them as base64 and
W&B receives the same bytes as images.
"""
from __future__ import annotations

import io

import numpy as np

DPI = 100
FAMILY_COLOURS = {"vae": ("#1f77b4", "#6baed6", "#08519c", "#9ecae1"),
                  "gan": ("#d62728", "#fc9272", "#a50f15", "#fcbba1")}
REAL_COLOUR = "#555555"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def colours(runs) -> list[str]:
    """One colour per run: blues for VAEs, reds for GANs, other kinds from the default cycle."""
    seen: dict[str, int] = {}
    out = []
    for i, run in enumerate(runs):
        shades = FAMILY_COLOURS.get(run.kind)
        j = seen.get(run.kind, 0)
        seen[run.kind] = j + 1
        out.append(shades[j % len(shades)] if shades else f"C{(i + 2) % 10}")
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def image_png(image_hwc: np.ndarray) -> bytes:
    """A uint8 (H, W, C) image as PNG (grey stays one channel)."""
    from PIL import Image

    arr = image_hwc[..., 0] if image_hwc.ndim == 3 and image_hwc.shape[-1] == 1 else image_hwc
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def quality_bars(runs, extractor: str) -> bytes | None:
    """FD and KID (lower is better), precision/recall/density/coverage (higher is better)."""
    if not runs:
        return None
    plt = _plt()
    cols = colours(runs)
    panels = [(f"fd_{extractor}", f"Fréchet distance ({extractor}) ↓", None),
              (f"kid_{extractor}", f"KID ({extractor}) ↓", f"kid_{extractor}_std"),
              ("pr", "precision / recall ↑", None), ("dc", "density / coverage ↑", None)]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.0))
    x = np.arange(len(runs))
    names = [r.name for r in runs]
    for ax, (key, title, err) in zip(axes, panels):
        if key in ("pr", "dc"):
            a, b = ("precision", "recall") if key == "pr" else ("density", "coverage")
            va = [r.quality.get(f"{a}_{extractor}", np.nan) for r in runs]
            vb = [r.quality.get(f"{b}_{extractor}", np.nan) for r in runs]
            ax.bar(x - 0.2, va, 0.4, color=cols, edgecolor="black")
            ax.bar(x + 0.2, vb, 0.4, color=cols, edgecolor="black", hatch="//")
            from matplotlib.patches import Patch

            ax.legend(handles=[Patch(facecolor="white", edgecolor="black", label=a),
                               Patch(facecolor="white", edgecolor="black", hatch="//", label=b)],
                      fontsize=7, loc="upper right")
        else:
            values = [r.quality.get(key, np.nan) for r in runs]
            yerr = [r.quality.get(err, 0.0) for r in runs] if err else None
            ax.bar(x, values, 0.6, color=cols, edgecolor="black", yerr=yerr, capsize=3)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return _png(fig)


def class_share_bars(runs, real_shares: dict[int, float] | None) -> bytes | None:
    """Share of each class among the samples (probe, confident predictions) beside the real shares."""
    runs = [r for r in runs if r.classes]
    if not runs:
        return None
    plt = _plt()
    classes = sorted({c for r in runs for c in r.classes["class_frequencies"]})
    fig, ax = plt.subplots(figsize=(13, 2.8))
    groups = len(runs) + (1 if real_shares else 0)
    width = 0.8 / groups
    x = np.arange(len(classes))
    offset = 0
    if real_shares:
        ax.bar(x - 0.4 + width / 2, [real_shares.get(c, 0.0) for c in classes], width, color=REAL_COLOUR, label="real")
        offset = 1
    for i, (run, col) in enumerate(zip(runs, colours(runs))):
        ax.bar(x - 0.4 + width * (i + offset + 0.5), [run.classes["class_frequencies"].get(c, 0.0) for c in classes],
               width, color=col, label=run.name)
    ax.set_xticks(x, [str(c) for c in classes], fontsize=8)
    ax.set_xlabel("class (probe's prediction)", fontsize=8)
    ax.set_ylabel("share of samples", fontsize=8)
    ax.legend(fontsize=7, ncol=min(groups, 6))
    fig.tight_layout()
    return _png(fig)


def sharpness_hist(runs, real: np.ndarray) -> bytes | None:
    """Per-image variance of the Laplacian (log scale), real images and each run's samples."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 2.8))
    everything = np.concatenate([real] + [r.sharpness for r in runs])
    positive = everything[everything > 0]
    if positive.size == 0:
        plt.close(fig)
        return None
    bins = np.logspace(np.log10(positive.min()), np.log10(positive.max()) + 1e-9, 40)
    ax.hist(np.clip(real, bins[0], None), bins=bins, color=REAL_COLOUR, alpha=0.45, label=f"real ({np.mean(real):.3g})")
    for run, col in zip(runs, colours(runs)):
        ax.hist(np.clip(run.sharpness, bins[0], None), bins=bins, histtype="step", linewidth=2, color=col,
                label=f"{run.name} ({np.mean(run.sharpness):.3g})")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a short log axis
    ax.set_xlabel("variance of the Laplacian per image (higher = sharper); legend: mean", fontsize=8)
    ax.set_ylabel("images", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def loss_curves(runs) -> bytes | None:
    """Each run's logged losses (own panel: VAE and GAN losses have different scales)."""
    runs = [r for r in runs if r.stability and r.stability.losses]
    if not runs:
        return None
    plt = _plt()
    cols = min(len(runs), 3)
    rows = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 2.6 * rows), squeeze=False)
    for ax, run in zip(axes.flat, runs):
        for i, (key, (steps, values)) in enumerate(run.stability.losses.items()):
            ax.plot(steps, values, label=key, color=f"C{i}", linewidth=1.2)
        for name, alert in run.stability.alerts.items():
            ax.axvline(alert["first_step"], color="black", linestyle="--", linewidth=1, label=f"alert: {name}")
        ax.set_title(run.label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def grad_norm_curves(runs) -> bytes | None:
    """Gradient norms over steps (log scale), where the runs log them."""
    runs = [r for r in runs if r.stability and r.stability.grad_norms]
    if not runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 2.8))
    styles = ["-", "--", ":", "-."]
    for run, col in zip(runs, colours(runs)):
        for j, (key, (steps, values)) in enumerate(run.stability.grad_norms.items()):
            ax.plot(steps, values, styles[j % len(styles)], color=col, label=f"{run.name}: {key}", linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("gradient norm", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def smoothness_plot(runs, path: str = "prior_slerp") -> bytes | None:
    """Step size along decoded latent paths over the path's mean step (1 = even), mean and
    spread over paths; legend: the coefficient of variation (0 = perfectly even)."""
    runs = [r for r in runs if path in r.paths]
    if not runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 2.8))
    for run, col in zip(runs, colours(runs)):
        steps = run.paths[path]["steps"]  # (T-1, P)
        t = np.arange(1, steps.shape[0] + 1)
        mean = steps.mean(1)
        ax.plot(t, mean, "o-", color=col, label=f"{run.name}: CV {run.paths[path]['cv']:.3f}")
        ax.fill_between(t, steps.min(1), steps.max(1), color=col, alpha=0.15)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel("step along the path (frame k-1 -> k)", fontsize=8)
    ax.set_ylabel("pixel change / path mean", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def roc_plot(runs) -> bytes | None:
    """ROC curves of the VAE anomaly scores."""
    runs = [r for r in runs if r.roc]
    if not runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    styles = {"iw_nll": "-", "neg_elbo": "--", "recon_mse": ":"}
    for run, col in zip(runs, colours(runs)):
        for key, (fpr, tpr) in run.roc.items():
            ax.plot(fpr, tpr, styles.get(key, "-"), color=col,
                    label=f"{run.name}: {key} (AUROC {run.vae[f'auroc_{key}']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate", fontsize=8)
    ax.set_ylabel("true positive rate", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def seed_spread(groups, extractor: str) -> bytes | None:
    """FD of each run of a config repeated with several seeds, one column per config."""
    groups = [g for g in groups if len(g) > 1]
    if not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.8))
    key = f"fd_{extractor}"
    for i, group in enumerate(groups):
        values = [r.quality.get(key, np.nan) for r in group]
        col = colours(group)[0]
        ax.scatter(np.full(len(values), i) + np.linspace(-0.08, 0.08, len(values)), values, color=col, zorder=3)
        ax.errorbar(i + 0.25, np.nanmean(values), yerr=np.nanstd(values), fmt="s", color="black", capsize=4)
    ax.set_xticks(range(len(groups)), [f"{g[0].kind.upper()} {g[0].arch} ({len(g)} seeds)" for g in groups], fontsize=8)
    ax.set_ylabel(f"Fréchet distance ({extractor})", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)
