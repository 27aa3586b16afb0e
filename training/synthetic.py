"""The built-in synthetic data set (``fastpair.training.data.load("synthetic", seed)``): a multimodal emotion
task where fusion wins and what the modalities share is what a pairwise contrastive objective can find.

K = 4 classes (named like IEMOCAP's), T = 20 steps, text (T, 300), audio (T, 74), vision (T, 35); 4000 / 400 /
800 samples, generated from the seed in about a second. One sample:

1. Emotion. A class c (uniform) and a shared latent u = mu_c + eps in R^8, eps ~ N(0, I): the class mean
   (orthogonal means of norm 2.5) plus a within-class jitter that every modality sees. A linear classifier
   on u is right about 90% of the time.
2. Partial views. Modality m sees P_m u, where P_m removes the direction mu_a - mu_b of one pair of classes:
   text cannot tell neutral from happy, audio sad from angry, vision happy from angry. One modality alone is
   ambiguous, any two together are not: fusion wins.
3. Expression over time. h_m = tanh(G_m P_m u) in R^16 (G_m fixed random) is expressed with a per-sample,
   per-modality envelope e_t: a Gaussian bump (random centre within the valid steps, width 2-5 steps) minus
   70% of its average over the valid steps, so the time average keeps only a faint trace of the signal.
4. Private nuisance in the same feature directions: x_t = A_m (3 e_t h_m + s_m) + o_m + n_t, with A_m (F_m, 16)
   fixed random, s_m ~ N(0, 1.6^2 I) a style constant over the sequence, o_m ~ N(0, 0.2^2) a per-feature offset
   constant over the sequence, n_t ~ N(0, 0.3^2) step noise; s_m, o_m, n_t are independent across modalities.
   Audio features get fixed scales spanning 4 decades and 2 constant columns (as COVAREP's have).
5. Corruption. Lengths uniform in 10..20 steps (zero padding at the end, the same for all modalities); 12% of
   samples have one modality uninformative (no signal: pure nuisance), 2% one modality missing (no valid step).

Why it tells the encoders apart: mean-pooled, the signal is a faint trace under s_m, which lies in the same 16
directions, so a linear probe on pooled raw features (or on a randomly initialized encoder, which is close to
a random projection of them) does poorly. What the modalities share is the time-varying part, h_m through
e_t; a pairwise contrastive objective rewards exactly what is shared, and a trained temporal encoder can pull
it out of the sequence. The per-sample offset o_m is kept small on purpose: large unique private offsets let
a contrastive model memorize the training pairs within a few epochs.
"""

from __future__ import annotations

import numpy as np

from .names import IEMOCAP_CLASSES, MODALITIES, SPLITS

SYNTHETIC_DIMS = {"text": 300, "audio": 74, "vision": 35}
# The pair of classes each modality cannot tell apart (its view of the latent lacks their difference).
CONFUSED = {"text": (0, 1), "audio": (2, 3), "vision": (1, 3)}
# Scales of the generative process (see the module docstring): class-mean norm (the jitter has std 1), signal
# amplitude, the fraction of the envelope's time average removed, private style, private offset, step noise.
# style 1.6 with 4000 train samples: strong enough that untrained encoders probe poorly, weak enough that pairwise
# training still starts (README's training section has the probe numbers of a weaker style).
SYNTHETIC = dict(radius=2.5, amplitude=3.0, centre=0.7, style=1.6, offset=0.2, noise=0.3)


def make_synthetic(seed: int = 0, n_train: int = 4000, n_valid: int = 400, n_test: int = 800, steps: int = 20,
                   p_uninformative: float = 0.12, p_missing: float = 0.02) -> dict:
    """The raw synthetic data in a layout ``load`` reads: {split: {"text": (N, T, 300) float32, ...,
    "{m}_lengths": (N,) int64, "labels": (N,) int64, "latent": (N, 8) float32, the shared latent u}}.
    The generative process is in the module docstring; all of it is drawn from default_rng(seed)."""
    rng = np.random.default_rng(seed)
    c = SYNTHETIC
    k, latent, hidden = len(IEMOCAP_CLASSES), 8, 16
    # 1. class means: orthogonal, of norm 2.5 (pairwise distance 3.5) in R^8; the jitter has std 1
    mu = c["radius"] * np.linalg.qr(rng.normal(size=(latent, k)))[0].T
    params = {}  # per modality, fixed: the view P_m, the mixing G_m, the feature map A_m, feature scales
    for m, f in SYNTHETIC_DIMS.items():
        a, b = CONFUSED[m]
        v = (mu[a] - mu[b]) / np.linalg.norm(mu[a] - mu[b])
        view = np.eye(latent) - np.outer(v, v)  # 2. blind to the direction that separates classes a and b
        mix = rng.normal(scale=1.5 / np.sqrt(latent), size=(hidden, latent))
        feat = rng.normal(scale=1 / np.sqrt(hidden), size=(f, hidden))
        scale = 10.0 ** rng.uniform(-2, 2, size=f) if m == "audio" else np.ones(f)
        params[m] = (view @ mix.T, feat.T, scale)
    t = np.arange(steps)
    out = {}
    for split, n in zip(SPLITS, (n_train, n_valid, n_test)):
        y = rng.integers(k, size=n)
        u = mu[y] + rng.normal(size=(n, latent))
        length = rng.integers(steps // 2, steps + 1, size=n)
        valid = t < length[:, None]
        # 5. at most one corrupted modality per sample: uninformative (no signal) or missing (no valid step)
        event, which = rng.uniform(size=n), rng.integers(len(MODALITIES), size=n)
        d = {"labels": y.astype(np.int64), "latent": u.astype(np.float32)}
        for i, (m, f) in enumerate(SYNTHETIC_DIMS.items()):
            to_hidden, to_feat, scale = params[m]
            h = np.tanh(u @ to_hidden)  # 3. (n, 16): the modality's nonlinear view of u
            amp = np.where((event < p_uninformative) & (which == i), 0.0, c["amplitude"])
            centre = rng.uniform(0, length)[:, None]
            width = rng.uniform(2, 5, size=(n, 1))
            env = np.exp(-0.5 * ((t - centre) / width) ** 2) * valid  # (n, T) bump within the valid steps
            env -= c["centre"] * env.sum(1, keepdims=True) / length[:, None] * valid  # 30% of its average stays
            style = rng.normal(scale=c["style"], size=(n, 1, hidden))  # 4. private, constant over the sequence
            x = (amp[:, None, None] * env[:, :, None] * h[:, None, :] + style) @ to_feat
            x += rng.normal(scale=c["offset"], size=(n, 1, f))  # private offset, constant over the sequence
            x += rng.normal(scale=c["noise"], size=(n, steps, f))
            x *= scale
            if m == "audio":
                x[:, :, :2] = 1.0  # constant columns (zero variance after masking)
            missing = (event >= p_uninformative) & (event < p_uninformative + p_missing) & (which == i)
            lengths = np.where(missing, 0, length)
            x[t >= lengths[:, None]] = 0.0  # zero padding at the end
            d[m], d[f"{m}_lengths"] = x.astype(np.float32), lengths.astype(np.int64)
        out[split] = d
    return out
