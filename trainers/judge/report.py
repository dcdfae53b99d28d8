"""`gentrain report`: one self-contained HTML page comparing VAE and GAN runs on the same images.

    gentrain report runs/demo-vae runs/demo-gan --out runs/demo-report.html [--shards HELD_OUT] [--n 500]

Every run is measured on the same reference images (`--shards`, default the first run's
training shards) by trainers.judge.report_measure; the plots come from report_figures
(matplotlib). The page holds everything (plots and image grids as base64 PNGs, CSS inline, no
script, a Content-Security-Policy that forbids loading anything), so it opens from disk with no
server and no network. Beside it, the same name with .json holds the numbers and the claims table; where the
runs logged to W&B, the same table and figures go to a new W&B run (offline unless a run was
online) under the report's folder.

The claims table tests what the VAE-vs-GAN comparison says, family against family (the mean
over the runs of a family): GAN samples sharper, GAN better FD/KID, GAN higher precision and VAE
higher recall, VAE latent paths smoother, the VAE's likelihood bound, reconstructions and anomaly
detection, GAN training less stable and prone to dropping modes. Each row says what was measured
and whether the claim holds on these runs ("yes", "no", "partly", or "n/a" where one family is
missing or the figure cannot be measured); thresholds are stated in the claim's text.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trainers.judge import report_figures as figs
from trainers.judge.report_measure import Reference, RunMeasure, measure_run, read_reference

ANOMALY_AUROC = 0.6  # the anomaly-detection claim holds from this AUROC of the IW bound on
KINDS = ("vae", "gan")
WANDB_MODES = ("auto", "offline", "online", "disabled")


@dataclass
class Claim:
    claim: str
    measured: str
    holds: str  # yes | no | partly | n/a (a suffix such as " (proxy)" says how far it was tested)


@dataclass
class Report:
    path: Path
    json_path: Path
    claims: list[Claim]
    runs: list[dict]
    reference: dict
    wandb: str | None
    seconds: float


# --------------------------------------------------------------------------------- runs


def _check_runs(run_dirs) -> list:
    """The runs' configs; one clear error (ValueError) when they cannot be compared."""
    from trainers.judge.inference import latest_checkpoint, load_run_config

    if not run_dirs:
        raise ValueError("report needs at least one run directory")
    if len(set(map(lambda p: Path(p).resolve(), run_dirs))) != len(run_dirs):
        raise ValueError("a run directory is given twice")
    cfgs = []
    for run_dir in run_dirs:
        cfg = load_run_config(run_dir)
        latest_checkpoint(run_dir)  # FileNotFoundError: no complete checkpoint
        if cfg.kind not in KINDS:
            raise ValueError(f"{run_dir} is a {cfg.kind} run; the report compares VAE and GAN runs")
        if cfg.kind == "gan" and cfg.model.arch == "mlp":
            raise ValueError(f"{run_dir} is a point-set GAN; those are judged by `python -m bench.gan_modes`")
        cfgs.append(cfg)
    shapes = {(int(c.data.image_size), int(c.data.channels)) for c in cfgs}
    if len(shapes) > 1:
        listed = ", ".join(f"{d} {c.data.image_size}px x{c.data.channels}" for d, c in zip(run_dirs, cfgs))
        raise ValueError(f"the runs were trained on images of different shapes ({listed}); compare runs of one data set")
    return cfgs


def _manifest(spec) -> dict:
    from data_shards.stream import find_manifest

    try:
        return find_manifest(spec) or {}
    except Exception:  # noqa: BLE001 - unreachable: nothing known about the split
        return {}


def _shard_hashes(manifest: dict) -> set:
    return {s.get("sha256") for s in manifest.get("shards", []) if s.get("sha256")}


def describe_reference(ref_manifest: dict, train_manifests: list[dict]) -> str:
    """Whether the reference images are held out from the runs' training data, as far as the
    manifests tell."""
    ref_hashes = _shard_hashes(ref_manifest)
    verdicts = set()
    for train in train_manifests:
        hashes = _shard_hashes(train)
        if ref_hashes and hashes and ref_hashes == hashes:
            verdicts.add("the training shards themselves (not held out)")
        elif (ref_manifest.get("source") == train.get("source") and train.get("split") == "train"
              and ref_manifest.get("split") == "test"):
            verdicts.add("held out (the test split of the runs' source)")
        elif ref_hashes and hashes and ref_hashes & hashes:
            verdicts.add("shards shared with training (not held out)")
        elif ref_manifest.get("source") and ref_manifest.get("source") == train.get("source"):
            verdicts.add(f"split '{ref_manifest.get('split', '?')}' of the source the runs trained on "
                         f"(split '{train.get('split', '?')}'): may overlap training")
        else:
            verdicts.add("unknown overlap with the training data")
    return "; ".join(sorted(verdicts)) or "unknown overlap with the training data"


def _classes_of(manifest: dict) -> set[int]:
    if manifest.get("labels"):
        return {int(c) for c in manifest["labels"]}
    return {int(c) for c, count in (manifest.get("class_counts") or {}).items() if count}


def anomaly_labels(ref: Reference, train_manifest: dict, given: list[int] | None) -> tuple[list[int], bool]:
    """(labels counted as anomalies, whether the VAE never saw them in training). Given labels win;
    else the reference's classes the training shards lack; else the last class (seen in training:
    the AUROC is then only a proxy for anomaly detection)."""
    classes = ref.classes
    if given:
        return sorted(given), not (set(given) & _classes_of(train_manifest))
    if not classes:
        return [], False
    unseen = sorted(set(classes) - _classes_of(train_manifest)) if _classes_of(train_manifest) else []
    if unseen and len(unseen) < len(classes):
        return unseen, True
    return [classes[-1]], False


def seed_groups(runs: list[RunMeasure]) -> list[list[RunMeasure]]:
    """Runs of one config that differ only in run name/dir/seed and logging, grouped in order."""
    from omegaconf import OmegaConf

    groups: dict[str, list[RunMeasure]] = {}
    for run in runs:
        cfg = OmegaConf.to_container(run.cfg, resolve=True)
        for key in ("run", "wandb"):
            cfg.pop(key, None)
        for key in ("resume", "progress", "keep_checkpoints", "ckpt_every", "sample_every", "log_every"):
            cfg.get("trainer", {}).pop(key, None)
        groups.setdefault(json.dumps(cfg, sort_keys=True, default=str), []).append(run)
    return list(groups.values())


# ------------------------------------------------------------------------------- claims


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _fam(runs, kind, getter) -> float | None:
    return _mean(getter(r) for r in runs if r.kind == kind)


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    value = float(value)
    if not np.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"


def _of(runs, kind) -> str:
    count = sum(r.kind == kind for r in runs)
    return "" if count == 1 else f" (mean of {count} runs)"


def _compare(claim: str, runs, getter, better: str, what: str) -> Claim:
    """A claim that the GAN's figure is `better` ("lower"/"higher") than the VAE's."""
    gan, vae = _fam(runs, "gan", getter), _fam(runs, "vae", getter)
    measured = f"{what}: GAN {_f(gan)}{_of(runs, 'gan')}, VAE {_f(vae)}{_of(runs, 'vae')}"
    if gan is None or vae is None:
        return Claim(claim, measured, "n/a")
    return Claim(claim, measured, "yes" if (gan < vae if better == "lower" else gan > vae) else "no")


def make_claims(runs: list[RunMeasure], ref: Reference, extractor: str, groups) -> list[Claim]:
    """The VAE-vs-GAN comparison's claims, measured on these runs."""
    real_sharp = float(np.mean(ref.sharpness))
    sg, sv = (_fam(runs, k, lambda r: float(np.mean(r.sharpness))) for k in ("gan", "vae"))
    measured = (f"mean variance of the Laplacian: GAN {_f(sg)}{_of(runs, 'gan')}, VAE {_f(sv)}{_of(runs, 'vae')}, "
                f"real images {_f(real_sharp)}")
    if sg is None or sv is None or real_sharp <= 0 or sg <= 0 or sv <= 0:
        holds = "n/a"
    else:
        closer = abs(np.log(sg / real_sharp)) < abs(np.log(sv / real_sharp))
        measured += f" (GAN/real {_f(sg / real_sharp)}, VAE/real {_f(sv / real_sharp)})"
        holds = "yes" if sg > sv and closer else ("partly" if sg > sv or closer else "no")
    rows = [Claim("GAN samples are sharper than the VAE's, as sharp as the real images (variance of the Laplacian: "
                  "the GAN's above the VAE's and nearer the real images'; noise is 'sharp' too, hence the second part)",
                  measured, holds)]
    fd = _compare(f"GAN samples are closer to the real images: lower Fréchet distance ({extractor} features)", runs,
                  lambda r: r.quality.get(f"fd_{extractor}"), "lower", "FD")
    kid_g = _fam(runs, "gan", lambda r: r.quality.get(f"kid_{extractor}"))
    kid_v = _fam(runs, "vae", lambda r: r.quality.get(f"kid_{extractor}"))
    fd.measured += f"; KID GAN {_f(kid_g)}, VAE {_f(kid_v)}"
    if fd.holds in ("yes", "no") and kid_g is not None and kid_v is not None and (kid_g < kid_v) != (fd.holds == "yes"):
        fd.holds = "partly"  # FD and KID disagree
    rows.append(fd)

    p_g, p_v = (_fam(runs, k, lambda r: r.quality.get(f"precision_{extractor}")) for k in ("gan", "vae"))
    r_g, r_v = (_fam(runs, k, lambda r: r.quality.get(f"recall_{extractor}")) for k in ("gan", "vae"))
    measured = f"precision GAN {_f(p_g)}, VAE {_f(p_v)}; recall GAN {_f(r_g)}, VAE {_f(r_v)}"
    if None in (p_g, p_v, r_g, r_v):
        holds = "n/a"
    else:
        hits = (p_g > p_v) + (r_v > r_g)
        holds = {2: "yes", 1: "partly", 0: "no"}[hits]
    rows.append(Claim("GAN samples are more faithful (higher precision), the VAE's more diverse (higher recall)",
                      measured, holds))

    smooth = _compare("The VAE's latent space is smoother: decoded images change more evenly along latent paths "
                      "(lower CV of step sizes, spherical paths between prior samples)", runs,
                      lambda r: r.paths.get("prior_slerp", {}).get("cv"), "higher", "CV")
    data_cv = _fam(runs, "vae", lambda r: r.paths.get("data_slerp", {}).get("cv"))
    if data_cv is not None:
        smooth.measured += f"; VAE between encoded real images {_f(data_cv)}"
    rows.append(smooth)

    vaes = [r for r in runs if r.kind == "vae" and r.vae]
    if not vaes:
        rows += [Claim("The VAE gives a likelihood: a bound on -log p(x) of the reference images", "no VAE run", "n/a"),
                 Claim("The VAE reconstructs its inputs", "no VAE run", "n/a"),
                 Claim("The VAE detects anomalies: its likelihood bound flags a class it never saw "
                       f"(AUROC >= {ANOMALY_AUROC})", "no VAE run", "n/a")]
    else:
        proper = [r for r in vaes if r.vae["is_likelihood"]]
        if proper:
            iw = _mean(r.vae["iw_nll_nats_per_dim"] for r in proper)
            elbo = _mean(r.vae["neg_elbo_nats_per_dim"] for r in proper)
            rows.append(Claim("The VAE gives a likelihood: a bound on -log p(x) of the reference images",
                              f"importance-weighted bound (K={proper[0].vae['k']}) {_f(iw, 4)} nats/dim, negative "
                              f"ELBO {_f(elbo, 4)} nats/dim{_of(proper, 'vae')}; the GAN has no such number",
                              "yes" if iw is not None else "no"))
        else:
            rows.append(Claim("The VAE gives a likelihood: a bound on -log p(x) of the reference images",
                              f"loss.likelihood={vaes[0].vae['likelihood']} is not a likelihood", "n/a"))
        psnr, ssim = _mean(r.vae["psnr"] for r in vaes), _mean(r.vae["ssim"] for r in vaes)
        rows.append(Claim("The VAE reconstructs its inputs (posterior mean decoded)",
                          f"PSNR {_f(psnr)} dB, SSIM {_f(ssim)} on {len(ref.images)} reference images; the GAN has "
                          "no encoder", "yes" if ssim is not None and ssim > 0 else "no"))
        rows.append(_anomaly_claim(vaes))
    rows.append(_stability_claim(runs, groups, extractor))
    rows.append(_collapse_claim(runs, extractor))
    return rows


def _anomaly_claim(vaes) -> Claim:
    claim = f"The VAE detects anomalies: its likelihood bound flags a class it never saw (AUROC >= {ANOMALY_AUROC})"
    scored = [r for r in vaes if "auroc_iw_nll" in r.vae]
    if not scored:
        return Claim(claim, "the reference images have no labels (or only one group): nothing to score", "n/a")
    auroc = _mean(r.vae["auroc_iw_nll"] for r in scored)
    r0 = scored[0].vae
    labels = ",".join(map(str, r0["anomaly_labels"]))
    unseen = all(r.vae.get("anomaly_unseen") for r in scored)
    measured = (f"AUROC of the IW bound {_f(auroc)} (negative ELBO {_f(_mean(r.vae['auroc_neg_elbo'] for r in scored))}, "
                f"reconstruction MSE {_f(_mean(r.vae['auroc_recon_mse'] for r in scored))}); anomalies: label {labels} "
                f"({r0['anomalies']} vs {r0['normals']} images)")
    verdict = "yes" if auroc >= ANOMALY_AUROC else "no"
    if not unseen:
        measured += (f"; label {labels} was in the VAE's training data, so this only approximates the claim "
                     f"(train on the other labels: gentrain shards build ... --labels)")
        verdict += " (proxy)"
    return Claim(claim, measured, verdict)


def _stability_claim(runs, groups, extractor) -> Claim:
    claim = ("GAN training is less stable: its losses jitter more from log to log, it skips steps or raises "
             "collapse alerts, its results spread more over seeds")
    jit_g = _fam(runs, "gan", lambda r: r.stability.jitter)
    jit_v = _fam(runs, "vae", lambda r: r.stability.jitter)
    skips = {k: sum(r.stability.skipped_steps for r in runs if r.kind == k) for k in KINDS}
    alerts = {k: sum(a["logs"] for r in runs if r.kind == k for a in r.stability.alerts.values()) for k in KINDS}
    measured = (f"loss jitter (median |change| between logs / median |loss|, 2nd half) GAN {_f(jit_g)}, VAE {_f(jit_v)}; "
                f"skipped steps GAN {skips['gan']}, VAE {skips['vae']}; alerts GAN {alerts['gan']}, VAE {alerts['vae']}")
    spread = {}
    for group in groups:
        if len(group) > 1:
            fds = [r.quality.get(f"fd_{extractor}") for r in group]
            spread.setdefault(group[0].kind, []).append(float(np.std(fds) / max(np.mean(fds), 1e-12)))
    if spread:
        measured += "; FD spread over seeds (std/mean) " + ", ".join(
            f"{k.upper()} {_f(_mean(v))}" for k, v in sorted(spread.items()))
    if not any(r.kind == "gan" for r in runs) or not any(r.kind == "vae" for r in runs):
        return Claim(claim, measured, "n/a")
    signs = []
    if jit_g is not None and jit_v is not None:
        signs.append(jit_g > jit_v)
    if skips["gan"] or skips["vae"]:
        signs.append(skips["gan"] > skips["vae"])
    if alerts["gan"] or alerts["vae"]:
        signs.append(alerts["gan"] > alerts["vae"])
    if "gan" in spread and "vae" in spread:
        signs.append(_mean(spread["gan"]) > _mean(spread["vae"]))
    if not signs:
        return Claim(claim, measured, "n/a")
    return Claim(claim, measured, "yes" if all(signs) else ("no" if not any(signs) else "partly"))


def _collapse_claim(runs, extractor) -> Claim:
    claim = "GANs drop modes: the GAN's samples cover fewer classes (or skew the class shares more) than the VAE's"
    cov = {k: _fam(runs, k, lambda r: r.classes["classes_covered"] if r.classes else None) for k in KINDS}
    kl = {k: _fam(runs, k, lambda r: r.classes["class_kl_to_real"] if r.classes else None) for k in KINDS}
    num = next((r.classes["num_classes"] for r in runs if r.classes), None)
    measured = (f"classes covered GAN {_f(cov['gan'])}/{_f(num)}, VAE {_f(cov['vae'])}/{_f(num)}; class-share KL to "
                f"real GAN {_f(kl['gan'])}, VAE {_f(kl['vae'])}; recall GAN "
                f"{_f(_fam(runs, 'gan', lambda r: r.quality.get(f'recall_{extractor}')))}, VAE "
                f"{_f(_fam(runs, 'vae', lambda r: r.quality.get(f'recall_{extractor}')))}")
    if None in (cov["gan"], cov["vae"], kl["gan"], kl["vae"]):
        return Claim(claim, measured if num else "the reference images have no labels: class coverage unknown", "n/a")
    if cov["gan"] < cov["vae"]:
        return Claim(claim, measured, "yes")
    if cov["gan"] == cov["vae"] and kl["gan"] > kl["vae"]:
        return Claim(claim, measured, "partly")
    return Claim(claim, measured, "no")


def claims_text(claims: list[Claim], width: int = 100) -> str:
    """The claims table as plain text (one claim per block)."""
    import textwrap

    lines = [f"{'holds?':<12} claim / measured", "-" * width]
    for c in claims:
        lines.append(f"{c.holds:<12} {c.claim}")
        lines += textwrap.wrap(c.measured, width - 15, initial_indent=" " * 15, subsequent_indent=" " * 15)
    return "\n".join(lines)


# --------------------------------------------------------------------------------- page

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1320px;padding:16px 24px;
color:#1d1d1f;background:#fff;line-height:1.35}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.25em;margin-top:1.6em;border-bottom:2px solid #ddd;padding-bottom:.2em}
h3{font-size:1.05em;margin:1em 0 .3em}
table{border-collapse:collapse;margin:.5em 0;font-size:.88em}th,td{border:1px solid #ccc;padding:3px 8px;vertical-align:top}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.claims td.holds{font-weight:600;text-align:center;white-space:nowrap}
.yes{background:#d9f2d9}.no{background:#f8d7d7}.partly{background:#fff1c2}.na{background:#eee;color:#666}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
figure{margin:4px 0}figcaption{font-size:.82em;color:#444;max-width:640px}
img.px{image-rendering:pixelated;border:1px solid #ddd}img.plot{max-width:100%}
.note{font-size:.85em;color:#555}.vae{color:#08519c;font-weight:600}.gan{color:#a50f15;font-weight:600}
code{background:#f5f5f5;padding:0 3px}
"""

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class Page:
    """Builds the HTML; every figure also kept as (key, title, png) for W&B."""

    def __init__(self):
        self.parts: list[str] = []
        self.figures: list[tuple[str, str, bytes]] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def image(self, key: str, title: str, png: bytes | None, css: str = "plot", scale: float = 1.0,
              caption: str = "") -> str:
        if png is None:
            return ""
        self.figures.append((key, title, png))
        from PIL import Image
        import io

        w, h = Image.open(io.BytesIO(png)).size
        src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        cap = f"<figcaption>{html.escape(caption or title)}</figcaption>"
        return (f'<figure><img class="{css}" src="{src}" alt="{html.escape(title)}" width="{round(w * scale)}" '
                f'height="{round(h * scale)}">{cap}</figure>')


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    out = [f'<table class="{cls}"><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for v in row:
            if isinstance(v, tuple):  # (html, css class): already escaped
                cells.append(f'<td class="{v[1]}">{v[0]}</td>')
            elif isinstance(v, (int, float, np.floating, np.integer)) or v is None:
                cells.append(f'<td class="num">{_f(v)}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _kind(run: RunMeasure) -> tuple[str, str]:
    return (f'<span class="{run.kind}">{run.kind.upper()}</span>', "")


def _grid_scale(grid: np.ndarray, target: int = 300) -> float:
    return max(1.0, min(3.0, target / grid.shape[1]))


def render(runs: list[RunMeasure], ref: Reference, claims: list[Claim], groups, extractor: str, n: int,
           reference_note: str, command: str) -> Page:
    page = Page()
    names = ", ".join(r.name for r in runs)
    page.add(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>gentrain report: {html.escape(names)}</title><style>{CSS}</style></head><body>")
    page.add(f"<h1>VAE vs GAN: {html.escape(names)}</h1>")
    src = ref.manifest.get("source", "?")
    page.add(f"<p class='note'>Made by <code>{html.escape(command)}</code> on "
             f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}. Every run is measured on the same {len(ref.images):,} "
             f"reference images of <code>{html.escape(ref.shards)}</code> (source {html.escape(str(src))}, split "
             f"{html.escape(str(ref.manifest.get('split', '?')))}; {html.escape(reference_note)}) against {n:,} samples "
             f"each, in the features of the <b>{html.escape(extractor)}</b> extractor (distances compare between these runs, "
             f"not with published FIDs).</p>")
    rows = [[r.name, _kind(r), r.arch, r.seed, r.parameters, r.cost.get("steps"), r.cost.get("world_size"),
             r.cost.get("precision") or "–", str(r.cfg.data.shards), str(r.run_dir)] for r in runs]
    page.add(_table(["run", "kind", "arch", "seed", "sampler parameters", "steps", "processes", "precision",
                     "trained on", "directory"], rows))

    # claims
    page.add("<h2 id='claims'>Claims</h2><p class='note'>What the VAE-vs-GAN comparison says, measured here "
             "(family against family; the mean where a family has several runs).</p>")
    css = {"yes": "yes", "no": "no", "partly": "partly", "n/a": "na"}
    page.add(_table(["claim", "measured", "holds?"],
                    [[c.claim, c.measured, (html.escape(c.holds), "holds " + css.get(c.holds.split(" ")[0], "na"))]
                     for c in claims], cls="claims"))

    # samples
    page.add("<h2 id='samples'>Samples side by side</h2><div class='row'>")
    real_grid = figs.image_png(_real_grid(ref))
    page.add(page.image("samples/real", "real (reference images)", real_grid, "px", _grid_scale(_real_grid(ref))))
    for r in runs:
        page.add(page.image(f"samples/{r.name}", f"{r.name} ({r.kind.upper()}, {r.arch})", figs.image_png(r.samples_grid),
                            "px", _grid_scale(r.samples_grid)))
    page.add("</div><p class='note'>The same seed for every run; VAE samples are decoder means of prior latents, GAN "
             "samples come from the EMA generator where there is one (as <code>gentrain sample</code>).</p>")

    # quality
    page.add(f"<h2 id='quality'>Sample quality and diversity</h2>")
    q = lambda r, k: r.quality.get(f"{k}_{extractor}")  # noqa: E731
    rows = [[r.name, _kind(r), q(r, "fd"), f"{_f(q(r, 'kid'))} ± {_f(r.quality.get(f'kid_{extractor}_std'))}",
             q(r, "precision"), q(r, "recall"), q(r, "density"), q(r, "coverage"),
             (f"{r.classes['classes_covered']}/{r.classes['num_classes']}" if r.classes else "–"),
             (r.classes["class_kl_to_real"] if r.classes else None)] for r in runs]
    page.add(_table(["run", "kind", "FD ↓", "KID ↓ (± std over 50 random halves)", "precision ↑", "recall ↑", "density ↑",
                     "coverage ↑", "classes covered", "class KL to real ↓"], rows))
    page.add(page.image("quality", "FD, KID, precision/recall, density/coverage", figs.quality_bars(runs, extractor)))
    if ref.probe is not None:
        real_shares = {int(c): float(f) for c, f in zip(ref.probe.classes, ref.probe.real_freq)}
        page.add(page.image("classes", "per-class shares of the samples",
                            figs.class_share_bars(runs, real_shares),
                            caption=f"Share of each class among the samples the probe classifies confidently (a "
                                    f"logistic regression on the reference shards, held-out accuracy "
                                    f"{ref.probe.held_out_accuracy:.0%}); grey: the real shares. A class counts as "
                                    f"covered from a quarter of a uniform share."))

    # sharpness
    page.add("<h2 id='sharpness'>Sharpness</h2>")
    real_mean = float(np.mean(ref.sharpness))
    rows = [["real images", "", real_mean, float(np.median(ref.sharpness)), 1.0]]
    rows += [[r.name, _kind(r), float(np.mean(r.sharpness)), float(np.median(r.sharpness)),
              float(np.mean(r.sharpness)) / max(real_mean, 1e-12)] for r in runs]
    page.add(_table(["images", "kind", "mean Laplacian variance", "median", "mean / real"], rows))
    page.add(page.image("sharpness", "variance of the Laplacian per image", figs.sharpness_hist(runs, ref.sharpness)))

    # stability
    page.add("<h2 id='stability'>Stability</h2>")
    rows = []
    for r in runs:
        s = r.stability
        alerts = ", ".join(f"{k}: {v['logs']} log(s) from step {v['first_step']}" for k, v in s.alerts.items()) or "none"
        final = ", ".join(f"{k} {_f(v[1][-1])}" for k, v in s.losses.items() if len(v[1])) or "–"
        rows.append([r.name, _kind(r), s.last_step, s.main_loss or "–", s.jitter, s.skipped_steps, alerts, final])
    page.add(_table(["run", "kind", "last logged step", "main loss", "loss jitter", "skipped steps (non-finite)",
                     "alerts", "final losses"], rows))
    page.add("<p class='note'>Loss jitter: median |change| of the main loss between consecutive logs over the "
             "second half of the run, over its median |value| (scale-free; each log averages its interval).</p>")
    page.add("<div class='row'>")
    page.add(page.image("losses", "loss curves (metrics.jsonl)", figs.loss_curves(runs)))
    page.add(page.image("grad_norms", "gradient norms", figs.grad_norm_curves(runs),
                        caption="Gradient norms as logged (the GAN logs G's and D's; a run without any is not drawn)."))
    page.add("</div>")
    multi = [g for g in groups if len(g) > 1]
    if multi:
        rows = []
        for g in multi:
            fds = [r.quality.get(f"fd_{extractor}") for r in g]
            covered = [r.classes["classes_covered"] for r in g if r.classes]
            rows.append([f"{g[0].kind.upper()} {g[0].arch}", ", ".join(r.name for r in g), len(g),
                         f"{_f(np.mean(fds))} ± {_f(np.std(fds))}", f"{_f(min(fds))} – {_f(max(fds))}",
                         f"{min(covered)} – {max(covered)}" if covered else "–",
                         sum(a["logs"] for r in g for a in r.stability.alerts.values())])
        page.add("<h3>Spread over seeds</h3>")
        page.add(_table(["config", "runs", "seeds", "FD mean ± std", "FD range", "classes covered", "alerts"], rows))
        page.add(page.image("seed_spread", "FD over seeds", figs.seed_spread(groups, extractor)))
    else:
        page.add("<p class='note'>Spread over seeds: give several runs of one config (differing only in "
                 "<code>run.seed</code>) to see it.</p>")

    # latent structure
    page.add("<h2 id='latent'>Latent structure</h2>")
    rows = [[r.name, _kind(r)] + [r.paths.get(p, {}).get("cv") for p in ("prior_slerp", "prior_linear", "data_slerp")]
            for r in runs]
    page.add(_table(["run", "kind", "CV, spherical prior paths", "CV, linear prior paths",
                     "CV, between encoded real images (VAE)"], rows))
    page.add(page.image("smoothness", "step sizes along latent paths", figs.smoothness_plot(runs),
                        caption="Pixel change from frame to frame along 8 spherical paths between prior latents, over "
                                "each path's mean change (1 = even steps; band: min-max over paths). Legend: the "
                                "coefficient of variation of the step sizes (0 = perfectly even), as the VAE logs "
                                "it in training."))
    page.add("<div class='row'>")
    for r in runs:
        for key, title in (("prior_slerp", "spherical paths between prior latents"),
                           ("data_slerp", "paths between encoded real images")):
            if key in r.paths:
                grid = r.paths[key]["grid"]
                page.add(page.image(f"paths/{r.name}/{key}", f"{r.name}: {title} (CV {r.paths[key]['cv']:.3f})",
                                    figs.image_png(grid), "px", _grid_scale(grid, 360)))
    page.add("</div>")

    # VAE only
    vaes = [r for r in runs if r.vae]
    page.add("<h2 id='vae'>What only the VAE gives</h2>")
    if vaes:
        rows = []
        for r in vaes:
            v = r.vae
            rows.append([r.name, v["likelihood"], v["neg_elbo"], v["iw_nll"], v["neg_elbo_nats_per_dim"],
                         v["iw_nll_nats_per_dim"], v["psnr"], v["ssim"], v.get("auroc_iw_nll"), v.get("auroc_neg_elbo"),
                         v.get("auroc_recon_mse"),
                         (",".join(map(str, v["anomaly_labels"])) + ("" if v.get("anomaly_unseen") else " (seen in training)"))
                         if v.get("anomaly_labels") else "–"])
        page.add(_table(["run", "likelihood", "negative ELBO", f"IW bound (K={vaes[0].vae['k']})", "ELBO nats/dim",
                         "IW nats/dim", "PSNR dB", "SSIM", "AUROC IW", "AUROC ELBO", "AUROC recon MSE",
                         "anomalous labels"], rows))
        page.add("<div class='row'>")
        for r in vaes:
            page.add(page.image(f"reconstructions/{r.name}", f"{r.name}: reconstructions (input | output)",
                                figs.image_png(r.recon_grid), "px", _grid_scale(r.recon_grid)))
        page.add(page.image("anomaly_roc", "anomaly ROC", figs.roc_plot(vaes),
                            caption="ROC of each per-image score at telling the anomalous labels from the rest."))
        page.add("</div>")
    else:
        page.add("<p class='note'>No VAE run given.</p>")

    # cost
    page.add("<h2 id='cost'>Cost</h2>")
    rows = [[r.name, _kind(r), r.cost.get("wall_seconds"), r.cost.get("samples_per_sec"), r.cost.get("images_seen"),
             r.cost.get("world_size"), r.cost.get("peak_memory_mb") if r.cost.get("peak_memory_mb") else "not recorded",
             r.seconds] for r in runs]
    page.add(_table(["run", "kind", "training wall time s", "samples/s (median)", "images seen", "processes",
                     "peak memory MB", "report's measuring s"], rows))
    page.add("<p class='note'>Wall time from metrics.jsonl's timestamps (first log interval included); samples/s "
             "over all processes. Timings depend on what else the machine was doing.</p>")
    page.add("</body></html>")
    return page


def _real_grid(ref: Reference) -> np.ndarray:
    from trainers.judge.report_measure import GRID_SAMPLES, nhwc_grid

    return nhwc_grid(ref.images[:GRID_SAMPLES])


# -------------------------------------------------------------------------------- W&B


def wandb_mode_for(cfgs, run_dirs, asked: str) -> tuple[str | None, str]:
    """(mode to log in, or None to skip; why)."""
    if asked not in WANDB_MODES:
        raise ValueError(f"--wandb must be one of {', '.join(WANDB_MODES)}, got {asked!r}")
    if asked == "disabled" or os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return None, "W&B disabled"
    if asked != "auto":
        return asked, f"--wandb {asked}"
    logged = [c for c, d in zip(cfgs, run_dirs) if c.wandb.mode != "disabled" and (Path(d) / "wandb").is_dir()]
    if not logged:
        return None, "no run logged to W&B (wandb.mode=disabled)"
    return ("online" if any(c.wandb.mode == "online" for c in logged) else "offline"), "the runs logged to W&B"


def log_to_wandb(mode: str, out_dir: Path, project: str, entity, runs: list[RunMeasure], claims: list[Claim],
                 figures: list[tuple[str, str, bytes]], name: str) -> str:
    """The runs' numbers and the claims as W&B tables, every figure as an image, in a new run
    whose files live under out_dir/wandb; returns that run's directory."""
    import io

    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb
    from PIL import Image

    run = wandb.init(project=project, entity=entity, name=name, job_type="report", dir=str(out_dir), mode=mode,
                     config={"runs": [str(r.run_dir) for r in runs]},
                     settings=wandb.Settings(console="off", x_disable_stats=True))
    try:
        summaries = [r.summary() for r in runs]
        columns = sorted({k for s in summaries for k in s}, key=lambda k: (k not in ("run", "kind", "arch"), k))
        numbers = wandb.Table(columns=columns, data=[[_plain(s.get(c)) for c in columns] for s in summaries])
        claims_table = wandb.Table(columns=["claim", "measured", "holds"],
                                   data=[[c.claim, c.measured, c.holds] for c in claims])
        payload = {"report/runs": numbers, "report/claims": claims_table}
        for key, title, png in figures:
            payload[f"report/{key}"] = wandb.Image(Image.open(io.BytesIO(png)), caption=title)
        run.log(payload)
        run_dir = str(Path(run.dir).parent)
    finally:
        run.finish()
    return run_dir


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


# ---------------------------------------------------------------------------------- main


def build_report(run_dirs, out, shards=None, n: int = 500, extractor: str = "random", seed: int = 0, k: int = 8,
                 anomaly: list[int] | None = None, wandb: str = "auto", command: str | None = None,
                 progress=print) -> Report:
    """Measure the runs on the same reference images and write the page (and its .json beside it)."""
    t0 = time.perf_counter()
    run_dirs = [Path(d) for d in run_dirs]
    if n < 10:
        raise ValueError(f"--n must be at least 10, got {n}")
    cfgs = _check_runs(run_dirs)
    wandb_mode, wandb_why = wandb_mode_for(cfgs, run_dirs, wandb)
    shards = shards if shards is not None else cfgs[0].data.shards
    out = Path(out)
    ref = read_reference(shards, int(cfgs[0].data.image_size), int(cfgs[0].data.channels), n, extractor,
                         run_dirs[0], cfgs[0])
    train_manifests = [_manifest(c.data.shards) for c in cfgs]
    note = describe_reference(ref.manifest, train_manifests)
    progress(f"[report] {len(ref.images)} reference images of {shards} ({note}); measuring {len(run_dirs)} run(s)")
    runs = []
    for run_dir, cfg, train_manifest in zip(run_dirs, cfgs, train_manifests):
        labels, unseen = anomaly_labels(ref, train_manifest, anomaly) if cfg.kind == "vae" else ([], False)
        m = measure_run(run_dir, ref, len(ref.images), seed=seed, k=k, anomalous=labels)
        if m.vae is not None and labels:
            m.vae["anomaly_unseen"] = unseen
        progress(f"[report] {m.label}: FD {_f(m.quality.get(f'fd_{ref.extractor.name}'))} ({m.seconds:.1f} s)")
        runs.append(m)
    groups = seed_groups(runs)
    claims = make_claims(runs, ref, ref.extractor.name, groups)
    command = command or ("gentrain report " + " ".join(map(str, run_dirs)) + f" --out {out}")
    page = render(runs, ref, claims, groups, ref.extractor.name, len(ref.images), note, command)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text("\n".join(page.parts), encoding="utf-8")
    os.replace(tmp, out)
    reference = {"shards": str(shards), "n": int(len(ref.images)), "extractor": ref.extractor.describe(),
                 "note": note, "source": ref.manifest.get("source"), "split": ref.manifest.get("split"),
                 "sharpness": float(np.mean(ref.sharpness)), "seconds": ref.seconds}
    wandb_dir = None
    if wandb_mode is not None:
        try:
            wandb_dir = log_to_wandb(wandb_mode, out.parent, cfgs[0].wandb.project, cfgs[0].wandb.entity, runs, claims,
                                     page.figures, name=f"report-{out.stem}")
            progress(f"[report] W&B ({wandb_mode}): {wandb_dir}")
        except Exception as err:  # noqa: BLE001 - the page is written; W&B trouble must not lose it
            progress(f"[report] W&B skipped: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    else:
        progress(f"[report] W&B skipped: {wandb_why}")
    seconds = time.perf_counter() - t0
    summaries = [r.summary() for r in runs]
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps({"report": str(out), "reference": reference, "runs": summaries,
                                     "claims": [asdict(c) for c in claims], "wandb": wandb_dir,
                                     "seconds": round(seconds, 1)}, indent=1, default=_plain))
    return Report(path=out, json_path=json_path, claims=claims, runs=summaries, reference=reference, wandb=wandb_dir,
                  seconds=seconds)
