"""SeLa: self-labelling via simultaneous clustering and representation learning (Asano, Rupprecht & Vedaldi, 2020).

Training alternates two steps on one objective, the cross-entropy between the model's predictions and labels
constrained to split the N samples equally over the K clusters of each head:

1. representation step: SGD on the heads' cross-entropy against the current labels, on augmented samples;
2. self-labelling step: new labels for all N samples and all T heads at once, the balanced plan of
   ``P ∝ softmax(logits)^λ`` -- ``sinkhorn_assign(logits, epsilon=1/λ)`` on the (T, N, K) head logits (a
   per-sample constant does not change the plan, so logits and log-probabilities give the same labels).

Labels start as a random equipartition; the self-labelling steps are spread evenly over the training steps, as in
the paper. The cluster potentials of one step warm-start the next. The learned clustering is the argmax of the
first head on un-augmented data.

    python examples/sela.py                 # digits, default settings, prints the results table
    python examples/sela.py --k 30          # over-clustering (accuracy then maps clusters by majority)
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

if __package__:
    from . import common
else:  # run as a script: python examples/sela.py
    import common

from otlabel import sinkhorn_assign


class SeLaNet(nn.Module):
    """A trunk followed by T linear clustering heads of K clusters each."""

    def __init__(self, trunk: nn.Module, dim: int, n_heads: int, k: int):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(dim, k) for _ in range(n_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Head logits, (T, B, K)."""
        z = self.trunk(x)
        return torch.stack([h(z) for h in self.heads])


def parse_args(argv=None):
    """SeLa's flags on top of the common ones."""
    p = common.base_parser(__doc__.split("\n")[0], epochs=100, batch_size=128, lr=0.1)
    p.add_argument("--heads", type=common.positive_int, default=3, help="number of clustering heads T")
    p.add_argument("--lam", type=common.positive_float, default=25.0, help="λ of P^λ: the Sinkhorn epsilon is 1/λ")
    p.add_argument(
        "--label-steps", type=common.positive_int, default=50, help="self-labelling steps spread over training"
    )
    p.add_argument(
        "--sinkhorn-tol", type=common.positive_float, default=1e-3, help="cluster-marginal L1 tolerance of each step"
    )
    p.add_argument(
        "--sinkhorn-max-iter", type=common.positive_int, default=1000, help="iteration cap of each self-labelling step"
    )
    return p.parse_args(argv)


def random_equipartition(n_heads: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Labels (T, N) splitting the N samples equally (up to one) over K clusters, independently per head."""
    return torch.stack([torch.randperm(n, generator=gen) % k for _ in range(n_heads)])


def self_label(model: SeLaNet, x: torch.Tensor, args, device, init):
    """One self-labelling step on all N samples and all heads in a single batched ``sinkhorn_assign`` call.

    Hard labels need only a nearly balanced plan, hence the loose default tolerance; confident heads make
    ``logits / epsilon`` large and Sinkhorn slow, so the previous step's potentials warm-start this one.
    """
    model.eval()
    logits = common.predict(lambda b: model(b).transpose(0, 1), x, device).transpose(0, 1)  # (T, N, K)
    model.train()
    logits = logits - logits.amax(-1, keepdim=True)  # changes nothing, but keeps logits / epsilon in range at large λ
    res = sinkhorn_assign(
        logits, epsilon=1.0 / args.lam, tol=args.sinkhorn_tol, max_iter=args.sinkhorn_max_iter, init=init, warn=False
    )
    return res


def train_epoch(model, opt, data, labels, aug, gen, args, step, total, state):
    """One epoch of cross-entropy on augmented samples; self-labelling at the scheduled steps. Returns mean loss."""
    losses = []
    idx_iter = common.batches(len(data.x), args.batch_size, gen)
    for idx in tqdm(list(idx_iter), desc=state["desc"], leave=False, disable=common.progress_off(args)):
        if step[0] in state["label_at"]:
            res = self_label(model, data.x, args, state["device"], state["potentials"])
            labels[:], state["potentials"] = res.labels, res.cluster_potentials
            state["history"].append(
                {"step": step[0], "n_iter": res.n_iter, "converged": res.converged, "error": res.marginal_error}
            )
        common.cosine_lr(opt, args.lr, step[0], total, warmup=total // 20)
        logits = model(aug(data.x[idx], gen).to(state["device"]))  # (T, B, K)
        target = labels[:, idx].to(state["device"])  # (T, B)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step[0] += 1
    return float(np.mean(losses))


@common.solver_errors("--lam: 1/λ")
def main(argv=None) -> dict:
    """Train SeLa, print the results table and return the results (also written to ``--out``)."""
    args = parse_args(argv)
    device = common.setup(args)
    data = common.load_data(args)
    epochs = 1 if args.quick else args.epochs
    gen = torch.Generator().manual_seed(args.seed)
    model = SeLaNet(common.make_trunk(data, args.width), 128, args.heads, data.n_clusters).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    labels = random_equipartition(args.heads, len(data.x), data.n_clusters, gen)
    args.batch_size = min(args.batch_size, len(data.x))  # a data set smaller than one batch: one batch per epoch
    steps_per_epoch = len(data.x) // args.batch_size
    total = epochs * steps_per_epoch
    n_label = 2 if args.quick else args.label_steps
    label_at = {s for s in np.linspace(0, total, n_label + 2)[1:-1].round().astype(int).tolist() if s < total}
    if len(label_at) < n_label:  # steps that round to the same training step (or past the last) are one (or none)
        print(f"note: --label-steps {n_label} spread over {total} training steps: {len(label_at)} run (label steps "
              "that fall on the same training step run once)", file=sys.stderr)  # fmt: skip
    state = {"label_at": label_at, "potentials": None, "device": device, "history": []}
    aug, step, losses = common.Augment(), [0], []
    start = time.perf_counter()
    for epoch in range(epochs):
        state["desc"] = f"sela epoch {epoch + 1}/{epochs}"
        losses.append(train_epoch(model, opt, data, labels, aug, gen, args, step, total, state))
    model.eval()
    logits = common.predict(lambda b: model(b)[0], data.x, device)  # (N, K), first head
    seconds = time.perf_counter() - start
    learned = {
        "method": f"SeLa (head 0 of {args.heads}, λ={args.lam:g})",
        **common.cluster_metrics(logits.argmax(1).numpy(), data.y, data.n_clusters),
        "seconds": seconds,
        "final_loss": losses[-1],
        "losses": losses,
        "label_steps": state["history"],
    }
    ckpt = {
        "model": model.state_dict(),
        "labels": labels,
        "cluster_potentials": state["potentials"],
        "args": vars(args),
    }
    return common.finish("sela", args, [learned, common.kmeans_baseline(data, args.seed)], ckpt)


if __name__ == "__main__":
    main()
