"""`gentrain report`: the VAE-vs-GAN comparison as one self-contained page.

Fast tests check the measurements and the claims on numbers made up for the purpose; the slow
ones train a tiny VAE and GAN on the digit shards, write the report with the real command and
open it in a real headless Chromium (Debian's package; skipped, with the reason, without it)."""
import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.conftest import run_gentrain
from trainers.judge import report
from trainers.judge.report_measure import (Reference, RunMeasure, Stability, cost, jitter, laplacian_variance,
                                           stability)

CLAIM_STARTS = ("GAN samples are sharper", "GAN samples are closer to the real images", "GAN samples are more faithful",
                "The VAE's latent space is smoother", "The VAE gives a likelihood", "The VAE reconstructs",
                "The VAE detects anomalies", "GAN training is less stable", "GANs drop modes")
HOLDS = re.compile(r"^(yes|no|partly|n/a)( \(proxy\))?$")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# ------------------------------------------------------------------------------- fast


def test_laplacian_variance_finds_the_blurred_images():
    rng = np.random.default_rng(0)
    sharp = (rng.random((8, 1, 32, 32)) > 0.5).astype(np.uint8) * 255
    blurred = sharp.astype(float)
    for _ in range(3):  # a few box blurs
        blurred = (blurred + np.roll(blurred, 1, 2) + np.roll(blurred, 1, 3) + np.roll(blurred, (1, 1), (2, 3))) / 4
    flat = np.full((8, 3, 32, 32), 128, np.uint8)
    v_sharp, v_blur, v_flat = (laplacian_variance(x) for x in (sharp, blurred.round().astype(np.uint8), flat))
    assert v_sharp.shape == (8,) and (v_sharp > 10 * v_blur).all() and (v_flat == 0).all()


def test_stability_and_cost_come_from_the_metrics_log(tmp_path):
    records = [{"step": s, "time": 1000.0 + s, "g_loss": 1.0 + 0.5 * ((s // 2) % 2), "d_loss": 1.2, "grad_norm_g": 2.0,
                "nonfinite_skipped": 1.0 if s == 6 else 0.0, "samples_per_sec": 100.0 + s, "images_seen": 64 * s,
                **({"alert/collapse": 1.0} if s >= 8 else {})} for s in range(2, 13, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 14, "g_lo')
    from trainers.judge.report_measure import read_metrics_log

    got = read_metrics_log(tmp_path)
    assert [r["step"] for r in got] == [2, 4, 6, 8, 10, 12]  # the torn last line is dropped
    s = stability(got, "gan")
    assert s.main_loss == "g_loss" and set(s.losses) == {"g_loss", "d_loss"} and list(s.grad_norms) == ["grad_norm_g"]
    assert s.skipped_steps == 1 and s.alerts == {"collapse": {"logs": 3, "first_step": 8}} and s.last_step == 12
    assert s.jitter == pytest.approx(0.5 / 1.0)  # |1.0 <-> 1.5| changes over a median |loss| of 1.0 (2nd half)
    c = cost(got, tmp_path)
    assert c["images_seen"] == 768 and c["samples_per_sec"] == 108.0 and c["peak_memory_mb"] is None
    assert c["wall_seconds"] == pytest.approx(10.0 + 128 / 102)  # first interval estimated from its rate
    assert jitter(np.ones(10)) == 0.0 and jitter(np.ones(2)) is None


def _measure(kind, fd, kid, precision, recall, sharp, cv, covered, kl, jit, alerts=0, seed=0, vae=None):
    run = RunMeasure(run_dir=Path(f"/runs/{kind}{seed}"), name=f"{kind}{seed}", kind=kind, arch="x", seed=seed,
                     cfg=OmegaConf.create({"kind": kind, "run": {"seed": seed, "name": f"{kind}{seed}"}, "model": {"a": 1}}))
    run.quality = {"fd_random": fd, "kid_random": kid, "precision_random": precision, "recall_random": recall}
    run.sharpness = np.full(4, sharp)
    run.paths = {"prior_slerp": {"cv": cv}}
    run.classes = {"classes_covered": covered, "num_classes": 10, "class_kl_to_real": kl}
    run.stability = Stability(losses={}, grad_norms={}, main_loss="loss", jitter=jit, skipped_steps=0,
                              alerts={"collapse": {"logs": alerts, "first_step": 1}} if alerts else {}, last_step=10)
    run.vae = vae
    return run


def _reference():
    return Reference(shards="s", images=np.zeros((100, 1, 8, 8), np.uint8), labels=np.zeros(100, int), manifest={},
                     image_size=8, channels=1, sharpness=np.full(100, 0.01))


VAE_NUMBERS = {"is_likelihood": True, "k": 8, "iw_nll_nats_per_dim": 0.3, "neg_elbo_nats_per_dim": 0.31, "psnr": 20.0,
               "ssim": 0.8, "auroc_iw_nll": 0.8, "auroc_neg_elbo": 0.79, "auroc_recon_mse": 0.85,
               "anomaly_labels": [9], "anomalies": 10, "normals": 90, "anomaly_unseen": True, "likelihood": "bernoulli"}


def test_claims_hold_where_the_numbers_say_so():
    vae = _measure("vae", fd=2.0, kid=0.02, precision=0.5, recall=0.6, sharp=0.004, cv=0.1, covered=10, kl=0.05,
                   jit=0.01, vae=dict(VAE_NUMBERS))
    gans = [_measure("gan", fd=1.0 + 0.2 * s, kid=0.01, precision=0.7, recall=0.4, sharp=0.011, cv=0.3, covered=7,
                     kl=0.4, jit=0.2, alerts=2, seed=s) for s in range(3)]
    runs = [vae, *gans]
    groups = report.seed_groups(runs)
    assert [len(g) for g in groups] == [1, 3]  # the GANs differ only in run.seed/name
    claims = report.make_claims(runs, _reference(), "random", groups)
    assert [c.claim.startswith(start) for c, start in zip(claims, CLAIM_STARTS)] == [True] * len(CLAIM_STARTS)
    assert [c.holds for c in claims] == ["yes"] * len(CLAIM_STARTS)
    assert "FD spread over seeds" in claims[7].measured and "mean of 3 runs" in claims[1].measured
    text = report.claims_text(claims)
    assert text.count("\nyes ") == len(CLAIM_STARTS)

    # The other way round: a noisy GAN (far sharper than real) that beats the VAE on nothing.
    noisy = _measure("gan", fd=3.0, kid=0.03, precision=0.1, recall=0.7, sharp=5.0, cv=0.05, covered=10, kl=0.01,
                     jit=0.001)
    seen = dict(VAE_NUMBERS, anomaly_unseen=False, auroc_iw_nll=0.55)
    vae.vae = seen
    claims = report.make_claims([vae, noisy], _reference(), "random", report.seed_groups([vae, noisy]))
    holds = {c.claim[:28]: c.holds for c in claims}
    assert holds["GAN samples are sharper than"] == "partly"  # sharper than the VAE, but further from real
    assert holds["GAN samples are closer to th"] == "no"
    assert holds["GAN samples are more faithfu"] == "no"
    assert holds["The VAE's latent space is sm"] == "no"
    assert holds["The VAE detects anomalies: i"] == "no (proxy)"  # the class was seen in training
    assert holds["GAN training is less stable:"] == "no" and holds["GANs drop modes: the GAN's s"] == "no"

    only_gan = report.make_claims(gans, _reference(), "random", report.seed_groups(gans))
    assert {c.holds for c in only_gan} == {"n/a"}  # nothing to compare against
    assert all(HOLDS.match(c.holds) for c in claims + only_gan)


def test_reference_is_called_held_out_only_when_it_is():
    train = {"source": "digits", "split": "train", "shards": [{"sha256": "a"}]}
    test = {"source": "digits", "split": "test", "shards": [{"sha256": "b"}]}
    assert report.describe_reference(test, [train]).startswith("held out")
    assert "not held out" in report.describe_reference(train, [train])
    assert "may overlap" in report.describe_reference(test, [{"source": "digits", "split": "all", "shards": [{"sha256": "c"}]}])


def test_anomaly_labels_are_the_classes_training_never_saw():
    ref = _reference()
    ref.labels = np.arange(100) % 10
    assert report.anomaly_labels(ref, {"labels": list(range(9))}, None) == ([9], True)
    assert report.anomaly_labels(ref, {"class_counts": {str(c): 5 for c in range(10)}}, None) == ([9], False)
    assert report.anomaly_labels(ref, {}, [3]) == ([3], True)


def test_report_usage_errors_are_one_line(tmp_path, capsys):
    from launcher.cli import main

    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a run directory" in err
    (tmp_path / "run").mkdir()
    assert main(["report", str(tmp_path / "run"), str(tmp_path / "run"), "--out", str(tmp_path / "r.html")]) == 2
    assert "given twice" in capsys.readouterr().err


# ------------------------------------------------------------------------------- slow

TRAIN = ("trainer.max_steps=10", "trainer.log_every=2", "trainer.ckpt_every=10", "trainer.sample_every=100",
         "trainer.keep_checkpoints=1", "trainer.progress=false", "data.batch_size=16", "wandb.mode=offline")


@pytest.fixture(scope="module")
def tiny_report(digit_shards, tmp_path_factory):
    """A VAE and a GAN trained for 10 steps, and `gentrain report` of the two (n=200)."""
    root = tmp_path_factory.mktemp("report")
    env = {"GENTRAIN_CACHE": str(root / "cache")}
    vae, gan = root / "vae", root / "gan"
    run_gentrain("train", "configs/vae_digits.yaml", f"run.dir={vae}", f"data.shards={digit_shards}", *TRAIN,
                 "loss.diagnostics_every=5", env=env)
    run_gentrain("train", "configs/gan_digits.yaml", f"run.dir={gan}", f"data.shards={digit_shards}", *TRAIN,
                 "diagnostics.every=0", env=env)
    out = root / "out" / "report.html"
    proc = run_gentrain("report", vae, gan, "--out", out, "--n", 200, env=env)
    return out, proc


@pytest.mark.slow
def test_report_of_two_tiny_runs_is_one_self_contained_page(tiny_report):
    out, proc = tiny_report
    page = out.read_text()
    assert "holds?" in proc.stdout and f"wrote {out}" in proc.stdout
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)  # nothing from the network
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "Content-Security-Policy" in page and "img-src data:" in page
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) >= 12  # grids (real, 2 runs), paths (3), reconstructions, and the plots
    from PIL import Image

    for src in images:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    table = page[page.index('<table class="claims">'):]
    table = table[:table.index("</table>")]
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td><td class=\"holds[^\"]*\">(.*?)</td></tr>", table, re.S)
    claims = [html.unescape(claim) for claim, _, _ in rows]
    assert [any(claim.startswith(s) for s in CLAIM_STARTS) for claim in claims] == [True] * len(CLAIM_STARTS), claims
    assert all(HOLDS.match(holds) for _, _, holds in rows)
    for section in ("samples", "quality", "sharpness", "stability", "latent", "vae", "cost"):
        assert f"id='{section}'" in page, section

    numbers = json.loads(out.with_suffix(".json").read_text())
    assert [r["kind"] for r in numbers["runs"]] == ["vae", "gan"] and len(numbers["claims"]) == len(CLAIM_STARTS)
    vae, gan = numbers["runs"]
    for key in ("fd_random", "kid_random", "precision_random", "recall_random", "sharpness", "smoothness_cv_prior_slerp"):
        assert np.isfinite(vae[key]) and np.isfinite(gan[key]), key
    assert np.isfinite(vae["iw_nll"]) and 0 <= vae["auroc_iw_nll"] <= 1 and "iw_nll" not in gan
    assert vae["cost_images_seen"] == gan["cost_images_seen"] == 160
    # Both runs logged to W&B (offline): the table and figures went to a new offline run beside the page.
    assert numbers["wandb"] and Path(numbers["wandb"]).parent == out.parent / "wandb"
    assert list(Path(numbers["wandb"]).glob("run-*.wandb"))


PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  window.__errors.push(String(e.message || (e.target && e.target.alt) || e.type));
  document.title = 'ERROR: ' + window.__errors.join(' | ');
}, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; });
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-broken', JSON.stringify(bad));
  document.body.setAttribute('data-errors', JSON.stringify(window.__errors));
  document.body.setAttribute('data-claims', String(document.querySelectorAll('table.claims tr').length - 1));
});
</script>"""


def _chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
                           "--v=0", "--window-size=1200,3000", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run does)")
def test_report_in_headless_chromium(tiny_report, tmp_path):
    out, _ = tiny_report
    page = out.read_text()
    # Our probe goes first in <head>, before the page's own CSP (which allows no script at all).
    head = page.index("<head>") + len("<head>")
    probed = tmp_path / "probed.html"
    probed.write_text(page[:head] + PROBE + page[head:])
    dom = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    attrs = {k: v.replace("&quot;", '"') for k, v in re.findall(r'data-(\w+)="([^"]*)"', body)}
    assert attrs.get("broken") == "[]" and attrs.get("errors") == "[]", attrs
    assert int(attrs["images"]) >= 12 and int(attrs["claims"]) == len(CLAIM_STARTS)
    assert "<title>ERROR" not in dom.stdout
    # The page itself, unchanged: no console message at all (CSP violations, failed loads, script errors).
    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", out.as_uri())
    console = [line for line in (dom.stderr + run.stderr).splitlines() if ":CONSOLE" in line]
    assert run.returncode == 0 and not console, console
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 3000)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 100  # text, tables, plots and grids: not a blank page
    white = max(count for count, c in colours if c == (255, 255, 255)) if any(c == (255, 255, 255) for _, c in colours) else 0
    assert white < 0.97 * img.size[0] * img.size[1]
