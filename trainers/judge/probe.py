"""A small classifier trained on labelled real shards, used to score generated images.

It answers the question a GAN user asks first: do my samples cover every class, and in the
proportions of the data? (The mode-coverage protocol of VEEGAN / PacGAN / Stacked MNIST.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_shards.stream import ShardStream


def read_labelled_images(shards, image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """One pass over shards: (uint8 images N,C,H,W, int labels N); samples without a label dropped."""
    stream = ShardStream(shards, 512, channels=channels, image_size=image_size, passes=1, shuffle_buffer=1)
    images, labels = [], []
    for batch in stream:
        keep = batch["label"] >= 0
        images.append(batch["image"][keep].numpy())
        labels.append(batch["label"][keep].numpy())
    return np.concatenate(images), np.concatenate(labels)


def _features(images_nchw: np.ndarray) -> np.ndarray:
    x = images_nchw.astype(np.float32) / 255.0
    n, c, h, w = x.shape
    if h >= 16:  # 2x2 average pooling: fewer features, same digits, a faster and steadier probe
        x = x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
    return x.reshape(n, -1)


@dataclass
class ClassCoverage:
    num_classes: int
    covered: int
    """Classes holding at least a quarter of their uniform share of confident predictions."""
    frequencies: dict[int, float]
    """Share of confidently classified samples per class."""
    kl_to_real: float
    """KL(generated class frequencies || real class frequencies), in nats."""
    confident_fraction: float
    """Fraction of samples the probe classifies with probability >= the threshold."""

    def as_dict(self) -> dict:
        return {"classes_covered": self.covered, "num_classes": self.num_classes,
                "class_frequencies": {str(k): round(v, 4) for k, v in self.frequencies.items()},
                "kl_to_real": self.kl_to_real, "confident_fraction": self.confident_fraction}


class ClassProbe:
    """Logistic regression on (pooled) pixels; fitted on 80% of the real data, checked on 20%."""

    def __init__(self, shards, image_size: int, channels: int, seed: int = 0):
        from sklearn.linear_model import LogisticRegression

        images, labels = read_labelled_images(shards, image_size, channels)
        if len(images) == 0:
            raise ValueError("the probe needs labelled shards (.cls); these have none")
        order = np.random.default_rng(seed).permutation(len(images))
        split = int(0.8 * len(order))
        train, held = order[:split], order[split:]
        self.classes = np.unique(labels)
        self.real_freq = np.bincount(np.searchsorted(self.classes, labels), minlength=len(self.classes)) / len(labels)
        self.model = LogisticRegression(max_iter=2000, C=0.5)
        self.model.fit(_features(images[train]), labels[train])
        self.held_out_accuracy = float(self.model.score(_features(images[held]), labels[held]))

    def coverage(self, images_nchw: np.ndarray, threshold: float = 0.8) -> ClassCoverage:
        """Class coverage of generated uint8 images (N, C, H, W)."""
        proba = self.model.predict_proba(_features(images_nchw))
        confident = proba.max(1) >= threshold
        counts = np.bincount(proba.argmax(1)[confident], minlength=len(self.classes)).astype(float)
        freq = counts / max(counts.sum(), 1.0)
        k = len(self.classes)
        eps = 1e-10
        kl = float(np.sum(freq * (np.log(freq + eps) - np.log(self.real_freq + eps))))
        return ClassCoverage(
            num_classes=k,
            covered=int((freq >= 0.25 / k).sum()),
            frequencies={int(c): float(f) for c, f in zip(self.classes, freq)},
            kl_to_real=kl,
            confident_fraction=float(confident.mean()),
        )
