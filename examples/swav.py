"""SwAV: unsupervised learning of visual features by contrasting cluster assignments (Caron et al., 2020).

Each batch is seen through two or more augmented views. Every view is embedded, projected and L2-normalised
to ``z``; its scores against K L2-normalised prototypes are ``z · cᵀ`` (cosine similarities). For each of the
large views, the *codes* ``q`` -- a soft assignment that spreads the batch equally over the prototypes -- come
from ``sinkhorn_assign(scores, epsilon=0.05, max_iter=3, tol=None)`` (the paper's 3 iterations; ``--converged``
iterates to tolerance instead, warm-started from the previous batch's potentials). The loss is the swapped
prediction: every other view predicts those codes from its own scores, a softmax at temperature τ = 0.1.

Options from the paper: prototypes frozen for the first steps, a queue of past embeddings that enlarges the
assignment problem when batches are small (``--queue-length``), and multi-crop (``--small-crops``): extra smaller
views that only predict, never get assigned.

    python examples/swav.py                         # digits, default settings, prints the results table
    python examples/swav.py --small-crops 2 --queue-length 512 --converged
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

if __package__:
    from . import common
else:  # run as a script: python examples/swav.py
    import common

from otlabel import sinkhorn_assign


class SwAVNet(nn.Module):
    """Trunk, projection MLP to the unit sphere, and K prototypes (rows of a bias-free linear layer)."""

    def __init__(self, trunk: nn.Module, dim: int, proj_dim: int, k: int):
        super().__init__()
        self.trunk = trunk
        self.projection = nn.Sequential(
            nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, proj_dim)
        )
        self.prototypes = nn.Linear(proj_dim, k, bias=False)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Put the prototypes back on the unit sphere (done before every step, as in the paper)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit embeddings (B, proj_dim) and their prototype scores (B, K)."""
        z = F.normalize(self.projection(self.trunk(x)), dim=1)
        return z, self.prototypes(z)


def parse_args(argv=None):
    """SwAV's flags on top of the common ones."""
    p = common.base_parser(__doc__.split("\n")[0], epochs=100, batch_size=256, lr=0.05)
    p.add_argument(
        "--views", type=common.positive_int, default=2, help="large (full-size) augmented views per sample, >= 2"
    )
    p.add_argument("--small-crops", type=common.count, default=0, help="extra small views (multi-crop): predict only")
    p.add_argument(
        "--small-size",
        type=common.number_type(int, 2, inclusive=True),
        default=6,
        help="side in pixels of a small view",
    )
    p.add_argument("--proj-dim", type=common.positive_int, default=32, help="dimension of the projections")
    p.add_argument("--epsilon", type=common.positive_float, default=0.05, help="Sinkhorn entropic regularisation")
    p.add_argument("--sinkhorn-iters", type=common.positive_int, default=3, help="fixed Sinkhorn iterations (tol=None)")
    p.add_argument("--converged", action="store_true", help="iterate Sinkhorn to tol=1e-4 instead, warm-started")
    p.add_argument("--temperature", type=common.positive_float, default=0.1, help="softmax temperature τ of the loss")
    p.add_argument(
        "--freeze-prototypes", type=common.count, default=100, help="steps during which prototypes do not move"
    )
    p.add_argument(
        "--queue-length", type=common.count, default=0, help="past embeddings added to the assignment (0: off)"
    )
    p.add_argument("--queue-start", type=common.count, default=10, help="epoch from which the queue is used")
    args = p.parse_args(argv)
    if args.views < 2:
        p.error("--views must be at least 2: codes of one view are predicted from the others")
    return args


class Assigner:
    """Codes for a stack of views through one batched ``sinkhorn_assign`` call, with an optional queue."""

    def __init__(self, args, n_views: int, proj_dim: int, device):
        self.eps, self.converged, self.iters = args.epsilon, args.converged, args.sinkhorn_iters
        self.queue = torch.zeros(n_views, args.queue_length, proj_dim, device=device) if args.queue_length else None
        self.filled = 0
        self.potentials = None
        self.n_iter = 0

    @torch.no_grad()
    def codes(self, z: torch.Tensor, scores: torch.Tensor, prototypes: torch.Tensor, use_queue: bool) -> torch.Tensor:
        """Codes (V, B, K) for embeddings z (V, B, D) and scores (V, B, K); then push z into the queue."""
        s, b = scores.detach(), scores.shape[1]
        if self.queue is not None and use_queue and self.filled > 0:
            s = torch.cat([s, self.queue[:, : self.filled] @ prototypes.T], dim=1)  # (V, B + Q, K)
        if self.converged:
            res = sinkhorn_assign(s, self.eps, max_iter=1000, tol=1e-4, init=self.potentials)
            self.potentials = res.cluster_potentials
        else:
            res = sinkhorn_assign(s, self.eps, max_iter=self.iters, tol=None)
        self.n_iter = res.n_iter
        self._push(z.detach())
        return res.codes[:, :b]

    def _push(self, z: torch.Tensor) -> None:
        if self.queue is None:
            return
        self.queue = torch.cat([z, self.queue[:, : -z.shape[1]]], dim=1)[:, : self.queue.shape[1]]
        self.filled = min(self.filled + z.shape[1], self.queue.shape[1])


def swapped_loss(codes: torch.Tensor, scores: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean over assigned views v and every other view w of the cross-entropy of q_v against softmax(s_w / τ)."""
    terms = []
    for v, q in enumerate(codes):  # q: (B, K)
        for w, s in enumerate(scores):
            if w != v:
                terms.append(-(q * F.log_softmax(s / temperature, dim=1)).sum(1).mean())
    return torch.stack(terms).mean()


def train_step(model, opt, assigner, x, aug, gen, args, step: int, use_queue: bool) -> float:
    """Forward every view, assign the large ones, take one SGD step on the swapped-prediction loss."""
    device = next(model.parameters()).device
    model.normalize_prototypes()
    large = torch.cat([aug(x, gen) for _ in range(args.views)]).to(device)
    z, s = model(large)
    scores = list(s.chunk(args.views))
    if args.small_crops:
        small = torch.cat([aug(x, gen, out_size=args.small_size, zoom=1.4) for _ in range(args.small_crops)])
        scores += list(model(small.to(device))[1].chunk(args.small_crops))
    zv = z.view(args.views, len(x), -1)
    q = assigner.codes(zv, torch.stack(scores[: args.views]), model.prototypes.weight, use_queue)
    loss = swapped_loss(q, scores, args.temperature)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if step < args.freeze_prototypes:
        model.prototypes.weight.grad = None
    opt.step()
    return loss.item()


@common.solver_errors("--epsilon")
def main(argv=None) -> dict:
    """Train SwAV, print the results table and return the results (also written to ``--out``)."""
    args = parse_args(argv)
    device = common.setup(args)
    data = common.load_data(args)
    epochs = 1 if args.quick else args.epochs
    batch_size = min(args.batch_size, len(data.x))
    gen = torch.Generator().manual_seed(args.seed)
    model = SwAVNet(common.make_trunk(data, args.width), 128, args.proj_dim, data.n_clusters).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    assigner = Assigner(args, args.views, args.proj_dim, device)
    aug, step, losses = common.Augment(), 0, []
    total = epochs * (len(data.x) // batch_size)
    start = time.perf_counter()
    for epoch in range(epochs):
        epoch_losses = []
        idx_list = list(common.batches(len(data.x), batch_size, gen))
        desc = f"swav epoch {epoch + 1}/{epochs}"
        for idx in tqdm(idx_list, desc=desc, leave=False, disable=common.progress_off(args)):
            common.cosine_lr(opt, args.lr, step, total, warmup=total // 20)
            use_queue = epoch >= args.queue_start
            epoch_losses.append(train_step(model, opt, assigner, data.x[idx], aug, gen, args, step, use_queue))
            step += 1
        losses.append(float(np.mean(epoch_losses)))
    model.eval()
    model.normalize_prototypes()
    scores = common.predict(lambda b: model(b)[1], data.x, device)  # (N, K)
    seconds = time.perf_counter() - start
    mode = "converged" if args.converged else f"{args.sinkhorn_iters} it"
    learned = {
        "method": f"SwAV (eps={args.epsilon:g}, {mode})",
        **common.cluster_metrics(scores.argmax(1).numpy(), data.y, data.n_clusters),
        "seconds": seconds,
        "final_loss": losses[-1],
        "losses": losses,
        "last_sinkhorn_iters": assigner.n_iter,
    }
    ckpt = {"model": model.state_dict(), "args": vars(args)}
    return common.finish("swav", args, [learned, common.kmeans_baseline(data, args.seed)], ckpt)


if __name__ == "__main__":
    main()
