"""Draw the plots shown in the documentation: ``python docs/images/make_images.py``.

Writes ranking.png, ranking_ground_truth.png and evaluation.png beside this
file. The three sections between the "----" lines are the examples the
documentation shows, verbatim, in this order (each reads the names the
ones before it defined): the bundled UCI digits, a few of the demo's
deterministic feature extractors, their scores from ``rank_models``, and a
linear probe's test accuracy as the ground truth. Afterwards the PNGs are
shrunk to a 256-colour palette. It runs on the CPU; the images are the same
on every run with the same library versions.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported

HERE = Path(__file__).resolve().parent
IMAGES = ("ranking.png", "ranking_ground_truth.png", "evaluation.png")


def shrink(path: Path) -> None:
    """Rewrite a PNG with a 256-colour palette (the plots have few colours) and no metadata: a few tens of KB."""
    from PIL import Image  # matplotlib depends on pillow

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


os.chdir(HERE)
start = time.perf_counter()

# ---- ranking.png: rank seven feature extractors of the digits by four scores (NCTI is pooled) ----
import torch  # noqa: E402

from torch_logme import rank_models  # noqa: E402
from torch_logme.demo import EXTRACTORS, load_digits  # noqa: E402

images, labels = load_digits()
extractors = dict(EXTRACTORS)
chosen = ["pixels", "orientation histograms (HOG-like)", "PCA, top 8 components", "blurred 4x4 thumbnail",
          "blurred 2x2 thumbnail", "pixels + strong noise", "4 random pixels"]
features = {name: extractors[name](images, torch.Generator().manual_seed(0)) for name in chosen}

ranking = rank_models(features, labels, ["logme", "h_score", "gbc", "ncti"])
fig, axes = ranking.plot()  # one panel per score, best model at the top
fig.savefig("ranking.png", dpi=100)

# ---- ranking_ground_truth.png: each score against a linear probe's test accuracy ----
from torch_logme.demo import linear_probe_accuracy, stratified_split  # noqa: E402

train, test = stratified_split(labels, seed=0)
accuracy = {name: linear_probe_accuracy(f, labels, train, test) for name, f in features.items()}
fig, axes = ranking.plot(ground_truth=accuracy, ground_truth_label="linear-probe test accuracy")
fig.savefig("ranking_ground_truth.png", dpi=100)

# ---- evaluation.png: how well each score orders the extractors on two tasks ----
from torch_logme import evaluate_scores  # noqa: E402

per_task = {}
for task, rows in {"digits 0-4": labels < 5, "digits 5-9": labels >= 5}.items():
    y = labels[rows] % 5  # class ids 0..4
    task_features = {name: f[rows] for name, f in features.items()}
    task_ranking = rank_models(task_features, y, ["logme", "h_score", "gbc", "ncti"])
    scores = {row.name: {s: row.scores[s] for s in task_ranking.scores} for row in task_ranking}
    train, test = stratified_split(y, seed=0)
    truth = {name: linear_probe_accuracy(f, y, train, test) for name, f in task_features.items()}
    per_task[task] = (scores, truth)

evaluation = evaluate_scores(per_task)  # task -> (scores, ground truth)
print(evaluation)
fig, axes = evaluation.plot()  # one panel per rank correlation; a group per task, and the mean
fig.savefig("evaluation.png", dpi=100)

# ----

import matplotlib.pyplot as plt  # noqa: E402

plt.close("all")
for name in IMAGES:
    shrink(HERE / name)
    print(f"wrote {HERE / name} ({(HERE / name).stat().st_size / 1024:.0f} KiB)")
print(f"{time.perf_counter() - start:.1f} s")
