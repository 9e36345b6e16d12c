"""A held-out analytic teacher for bench/families.py: a Gaussian mixture fitted to 4x4 RGB patches of the two photos
that ship with scikit-learn (``load_sample_images``: china.jpg, flower.jpg), pixels scaled to [-1, 1].

Nothing was tuned on it: it differs from the digits mixture every recipe here was developed on in shape (3x4x4 colour
vs 1x8x8 grey), content (natural-image patches vs handwritten digits) and spectrum, and it keeps an exact denoiser and
exact samples (FD is measurable). Deterministic (non-overlapping patches, scikit-learn's GaussianMixture with
random_state 0, 10 full-covariance components, reg_covar 1e-4):

    .venv/bin/python bench/heldout_mixture.py --out bench/patches-gmm.npz
    .venv/bin/python bench/families.py --teacher gmm:bench/patches-gmm.npz --json bench/families_patches.json
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def patches(size: int = 4) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    out = []
    for img in load_sample_images().images:  # (427, 640, 3) uint8
        h, w = (img.shape[0] // size) * size, (img.shape[1] // size) * size
        p = img[:h, :w].reshape(h // size, size, w // size, size, 3).transpose(0, 2, 4, 1, 3)
        out.append(p.reshape(-1, 3 * size * size))
    return np.concatenate(out).astype(np.float64) / 127.5 - 1.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/patches-gmm.npz")
    ap.add_argument("--components", type=int, default=10)
    args = ap.parse_args(argv)
    from sklearn.mixture import GaussianMixture

    x = patches()
    gm = GaussianMixture(n_components=args.components, covariance_type="full", reg_covar=1e-4, random_state=0,
                         max_iter=200).fit(x)
    np.savez(args.out, weights=gm.weights_, means=gm.means_, covs=gm.covariances_, shape=np.array([3, 4, 4]))
    print(f"{args.out}: {len(x)} patches, {args.components} components, converged={gm.converged_}, "
          f"mean log-likelihood {gm.score(x):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
