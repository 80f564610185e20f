"""DeepCluster baseline: deep clustering for unsupervised learning of visual features (Caron et al., 2018).

Every epoch: embed all N un-augmented samples with the current trunk, PCA-whiten and L2-normalise the features,
cluster them with k-means (the small torch k-means below, or faiss's with ``--faiss``), re-initialise the
classifier head, then train trunk and head with cross-entropy against the cluster labels, drawing samples
uniformly over the pseudo-labels (each cluster equally often) to counter k-means' unbalanced clusters.

In k-means, an empty cluster is re-seeded from a randomly chosen non-empty centroid (chosen with probability
proportional to its size), the two copies pushed slightly apart, as faiss does. ``--balanced`` swaps k-means'
nearest-centroid assignment for otlabel's balanced one, ``sinkhorn_assign(-‖z − c‖² / 2, epsilon)``, so every
cluster gets N/K samples: the ablation showing what the equipartition constraint changes. Both runs use the same
torch k-means (initialisation, re-seeding, iterations) so that the assignment step is the only difference;
``--faiss`` (plain runs only) trades that for faiss's speed on large N.

    python examples/deepcluster.py              # digits, default settings, prints the results table
    python examples/deepcluster.py --balanced
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

if __package__:
    from . import common
else:  # run as a script: python examples/deepcluster.py
    import common

from otlabel import sinkhorn_assign


def parse_args(argv=None):
    """DeepCluster's flags on top of the common ones."""
    p = common.base_parser(__doc__.split("\n")[0], epochs=60, batch_size=128, lr=0.05)
    p.add_argument("--pca-dim", type=common.positive_int, default=32, help="PCA-whitening dimension before k-means")
    p.add_argument("--kmeans-iters", type=common.positive_int, default=20, help="Lloyd iterations of each k-means")
    p.add_argument("--balanced", action="store_true", help="balanced assignment by otlabel instead of k-means'")
    p.add_argument("--ot-epsilon", type=common.positive_float, default=0.05, help="Sinkhorn epsilon of --balanced")
    p.add_argument("--faiss", action="store_true", help="faiss's k-means, not the torch one (not with --balanced)")
    args = p.parse_args(argv)
    if args.faiss and args.balanced:
        p.error("--faiss replaces the whole k-means, so it cannot take --balanced's assignment step: drop one")
    if args.faiss and importlib.util.find_spec("faiss") is None:
        p.error("--faiss needs faiss: pip install faiss-cpu (or faiss-gpu)")
    return args


def whiten(features: torch.Tensor, dim: int) -> torch.Tensor:
    """Centre, project on the top ``dim`` principal axes with unit variance each, then L2-normalise rows."""
    x = features.double() - features.double().mean(0)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    d = min(dim, int((s > 1e-8 * s[0]).sum()))
    x = u[:, :d] * np.sqrt(len(x))  # whitened principal components: (N, d), unit variance
    return F.normalize(x.float(), dim=1)


def reseed_empty(centroids: torch.Tensor, counts: torch.Tensor, gen: torch.Generator, delta: float = 1e-3) -> None:
    """Give every empty cluster a perturbed copy of a non-empty centroid (picked by size); push the pair apart."""
    for e in torch.nonzero(counts == 0).flatten().tolist():
        donor = int(torch.multinomial(counts.double(), 1, generator=gen))
        centroids[e] = centroids[donor] * (1 + delta)
        centroids[donor] = centroids[donor] * (1 - delta)
        counts[e] = counts[donor] // 2
        counts[donor] -= counts[e]


def assign(x: torch.Tensor, centroids: torch.Tensor, balanced: bool, epsilon: float) -> torch.Tensor:
    """Nearest centroid, or with ``balanced`` the equipartitioned optimal-transport assignment."""
    scores = -0.5 * torch.cdist(x, centroids).square()  # (N, K), higher is better
    if not balanced:
        return scores.argmax(1)
    return sinkhorn_assign(scores - scores.amax(1, keepdim=True), epsilon).labels  # a per-sample shift changes nothing


def torch_kmeans(
    x: torch.Tensor, k: int, iters: int, gen: torch.Generator, balanced: bool = False, epsilon: float = 0.05
) -> torch.Tensor:
    """Lloyd's k-means from K random samples, re-seeding empty clusters; return the labels (N,)."""
    centroids = x[torch.randperm(len(x), generator=gen)[:k]].clone()  # (K, D)
    for _ in range(iters):
        labels = assign(x, centroids, balanced, epsilon)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        reseed_empty(centroids, counts, gen)
    return assign(x, centroids, balanced, epsilon)


def cluster(x: torch.Tensor, k: int, args, gen: torch.Generator) -> torch.Tensor:
    """k-means labels of the rows of x: the torch k-means, or faiss's with ``--faiss``."""
    if args.faiss:
        import faiss  # parse_args checked that it imports

        km = faiss.Kmeans(x.shape[1], k, niter=args.kmeans_iters, seed=args.seed)
        km.train(x.numpy())
        return torch.from_numpy(km.index.search(x.numpy(), 1)[1][:, 0]).long()
    return torch_kmeans(x, k, args.kmeans_iters, gen, args.balanced, args.ot_epsilon)


def uniform_over_labels(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """N sample indices drawn so that every non-empty pseudo-label is equally likely, uniform inside it."""
    counts = torch.bincount(labels).double()
    return torch.multinomial(1.0 / counts[labels], len(labels), replacement=True, generator=gen)


def train_epoch(trunk, head, opts, data, labels, aug, gen, args, desc: str) -> float:
    """Cross-entropy of the head on augmented samples against the pseudo-labels; returns the mean loss."""
    device = next(trunk.parameters()).device
    order = uniform_over_labels(labels, gen)
    losses = []
    starts = range(0, len(order) - args.batch_size + 1, args.batch_size)
    for i in tqdm(starts, desc=desc, leave=False, disable=common.progress_off(args)):
        idx = order[i : i + args.batch_size]
        loss = F.cross_entropy(head(trunk(aug(data.x[idx], gen).to(device))), labels[idx].to(device))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def features_and_labels(trunk, data, args, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Current features of all samples (eval mode), whitened, and their cluster labels."""
    trunk.eval()
    feats = whiten(common.predict(trunk, data.x, device), args.pca_dim)
    trunk.train()
    return feats, cluster(feats, data.n_clusters, args, gen)


@common.solver_errors("--ot-epsilon")
def main(argv=None) -> dict:
    """Train DeepCluster, print the results table and return the results (also written to ``--out``)."""
    args = parse_args(argv)
    device = common.setup(args)
    data = common.load_data(args)
    epochs = 1 if args.quick else args.epochs
    args.batch_size = min(args.batch_size, len(data.x))
    gen = torch.Generator().manual_seed(args.seed)
    trunk = common.make_trunk(data, args.width).to(device)
    head = nn.Linear(128, data.n_clusters).to(device)
    opt = torch.optim.SGD(trunk.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    aug, losses = common.Augment(), []
    start = time.perf_counter()
    for epoch in range(epochs):
        _, labels = features_and_labels(trunk, data, args, device, gen)
        head.reset_parameters()  # a fresh classifier (and optimiser state) for the new, arbitrarily numbered labels
        opt_head = torch.optim.SGD(head.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
        desc = f"deepcluster epoch {epoch + 1}/{epochs}"
        losses.append(train_epoch(trunk, head, [opt, opt_head], data, labels, aug, gen, args, desc))
    _, labels = features_and_labels(trunk, data, args, device, gen)
    seconds = time.perf_counter() - start
    how = "balanced OT assignment" if args.balanced else "k-means"
    learned = {
        "method": f"DeepCluster ({how})",
        **common.cluster_metrics(labels.numpy(), data.y, data.n_clusters),
        "seconds": seconds,
        "final_loss": losses[-1],
        "losses": losses,
    }
    ckpt = {"trunk": trunk.state_dict(), "head": head.state_dict(), "labels": labels, "args": vars(args)}
    return common.finish("deepcluster", args, [learned, common.kmeans_baseline(data, args.seed)], ckpt)


if __name__ == "__main__":
    main()
