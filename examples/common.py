"""Shared pieces of the example trainers: flags, data, augmentations, the trunk, metrics and the results table.

Everything here is plain PyTorch, NumPy, scikit-learn and SciPy; ``otlabel`` is used by the trainers themselves,
only through its public API (``from otlabel import sinkhorn_assign``), exactly as a user's code would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import nn

# ----------------------------------------------------------------------------------------------- flags and setup


def number_type(kind, low: float, inclusive: bool = False, high: float = math.inf):
    """An argparse ``type``: a ``kind`` (int or float) above ``low`` (at or above it with ``inclusive``) and at most
    ``high``, so that ``--heads 0`` or ``--lam 0`` is a usage error naming the flag rather than a traceback from deep
    in training. Floats must also be finite."""
    what = "an integer" if kind is int else "a number"
    bound = ("a finite number " if kind is float else "") + (f">= {low}" if inclusive else f"> {low}")
    bound += f" and <= {high}" if high < math.inf else ""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value >= low if inclusive else value > low) or not value <= high or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = number_type(int, 0)
count = number_type(int, 0, inclusive=True)  # zero allowed: "none of these"
positive_float = number_type(float, 0.0)
non_negative_float = number_type(float, 0.0, inclusive=True)
seed_type = number_type(int, 0, inclusive=True, high=2**32 - 1)  # NumPy's seeds
batch_type = number_type(int, 1)  # batch norm needs two samples or more


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show ("(default: None)" says nothing)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def base_parser(description: str, *, epochs: int, batch_size: int, lr: float) -> argparse.ArgumentParser:
    """The flags every trainer shares; each trainer adds its own."""
    p = argparse.ArgumentParser(description=description, formatter_class=DefaultsHelp)
    p.add_argument(
        "--data-x",
        type=Path,
        help="a .npy array of samples (N, D), (N, H, W) or (N, C, H, W); default: scikit-learn's bundled digits",
    )
    p.add_argument("--data-y", type=Path, help="a .npy array (N,) of true labels, used only for evaluation")
    p.add_argument(
        "--vectors",
        action="store_true",
        help="read --data-x of shape (N, D) as vectors even when D is a square of 16 or more (64 columns of "
        "tabular data are not an 8x8 image)",
    )
    p.add_argument("--k", type=positive_int, help="number of clusters; default: the number of true classes")
    p.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the data")
    p.add_argument("--batch-size", type=batch_type, default=batch_size, help="samples per SGD step")
    p.add_argument(
        "--lr", type=positive_float, default=lr, help="SGD learning rate (SeLa, SwAV: the peak of a cosine schedule)"
    )
    p.add_argument("--weight-decay", type=non_negative_float, default=5e-4, help="SGD weight decay")
    p.add_argument("--width", type=positive_int, default=32, help="channels of the first conv layer of the trunk")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of every random generator")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="CPU threads for torch; these small models run fastest "
        "on one, and stay fast when other processes share the cores",
    )
    p.add_argument("--quick", action="store_true", help="one short epoch on a subset: for smoke tests")
    p.add_argument("--out", type=Path, help="directory for <trainer>_results.json and <trainer>.pt")
    p.add_argument("--no-progress", action="store_true", help="hide the per-epoch progress bars")
    return p


def progress_off(args: argparse.Namespace) -> bool | None:
    """tqdm's ``disable``: off with --no-progress; ``None`` lets tqdm turn it off when stderr is not a terminal
    (``make run > log``: a bar's carriage-return updates would fill the log)."""
    return True if args.no_progress else None


def setup(args: argparse.Namespace) -> torch.device:
    """Seed every generator and ask torch for deterministic kernels; return the device. An --out that cannot be a
    directory stops here, not after the training run whose results it was to hold."""
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"error: --out {args.out}: exists and is not a directory; --out names the directory for "
                         "<trainer>_results.json and <trainer>.pt")  # fmt: skip
    if args.out is not None:  # created now, and written to once: a read-only disk or a file on its path fails here
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=args.out):
                pass
        except OSError as err:
            raise SystemExit(f"error: --out {args.out}: cannot write there ({err.strerror or err}); give a directory "
                             "that can be created and written to") from None  # fmt: skip
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:  # a misspelt device type
        raise SystemExit(f"error: --device {args.device}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: CUDA is not available here; use --device cpu")
    try:
        torch.empty(0, device=device)  # a device this torch was not built for, or a GPU index that is not there
    except (RuntimeError, AssertionError) as err:
        raise SystemExit(f"error: --device {args.device}: {str(err).splitlines()[0]}") from None
    return device


# ------------------------------------------------------------------------------------------------------ data


@dataclass
class Data:
    """Samples as images (N, C, H, W) scaled to [0, 1] when they have a square layout, else vectors (N, D)
    standardised per feature (see :func:`scale`)."""

    x: torch.Tensor
    y: np.ndarray | None
    n_clusters: int

    @property
    def is_image(self) -> bool:
        return self.x.dim() == 4

    @property
    def flat(self) -> np.ndarray:
        return self.x.reshape(len(self.x), -1).numpy()


def _as_images(x: np.ndarray) -> np.ndarray:
    """Give (N, D) data with a square D an image layout (N, 1, s, s); (N, H, W) becomes (N, 1, H, W)."""
    if x.ndim == 2:
        side = math.isqrt(x.shape[1])
        return x.reshape(len(x), 1, side, side) if side * side == x.shape[1] and side >= 4 else x
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        return x
    raise ValueError(f"--data-x must be (N, D), (N, H, W) or (N, C, H, W); got shape {x.shape}")


def scale(x: np.ndarray) -> np.ndarray:
    """Images (4-d) to [0, 1] by their global minimum and maximum: pixels share one scale, and the augmentations
    pad with 0. Vectors (N, D) standardised per feature (zero mean, unit variance per column), as is usual for
    tabular data: its columns come in their own units (wine: proline ~1,000 next to hue ~1), and one global range
    would squeeze the small-unit columns to nearly constant values. Constant columns become 0. Both divide by the
    largest magnitude first (of all pixels; of each column), which changes neither result but keeps the range and the
    variance finite for values near float64's limits (1e200 squared overflows, 1e-315 squared underflows)."""
    if x.ndim == 4:
        top = np.abs(x).max()
        x = x / top if top > 0 else x
        return (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
    top = np.abs(x).max(axis=0)
    x = x / np.where(top > 0, top, 1.0)
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def load_data(args: argparse.Namespace) -> Data:
    """Load digits (default) or the user's arrays and :func:`scale` them; ``--quick`` keeps a 400-sample subset.
    Arrays that cannot be trained on (wrong shapes, non-numeric or non-finite values, fewer than 2 samples) stop
    here with an ``error:`` naming the flag, before any training."""
    if args.data_x is None:
        if args.data_y is not None:
            raise SystemExit("error: --data-y without --data-x: give the samples too (digits bring their own labels)")
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
    else:
        x, y = _load_npy(args.data_x, "--data-x"), None
        if args.data_y is not None:
            y = _load_npy(args.data_y, "--data-y")
            if y.ndim == 2 and y.shape[1] == 1:
                y = y[:, 0]
            if y.ndim != 1 or len(y) != len(x):
                raise SystemExit(f"error: --data-y must have shape ({len(x)},), one label per sample; got {y.shape}")
            if y.dtype.kind in "fc" and np.isnan(y).any():  # np.unique would make the NaNs a class of their own
                first = int(np.flatnonzero(np.isnan(y))[0])
                raise SystemExit(f"error: --data-y contains NaN (first at index {first}): give every sample a label, "
                                 "or drop the unlabelled samples from both arrays")  # fmt: skip
        if x.dtype.kind not in "biuf":
            raise SystemExit(f"error: --data-x must hold numbers; got dtype {x.dtype}")
        if not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0]
            where = tuple(bad.tolist())
            raise SystemExit(f"error: --data-x contains NaN or inf (first at index {where}): drop or impute them")
    try:
        if args.vectors and x.ndim != 2:
            raise ValueError(f"--vectors reads (N, D) arrays as vectors; --data-x has shape {x.shape}")
        x = x if args.vectors else _as_images(x)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if len(x) < 2:
        raise SystemExit(f"error: --data-x has {len(x)} sample; training needs 2 or more")
    if x.size == 0:  # (N, 0), or images with no channel or no row: numpy's "zero-size array" error, mid-load
        raise SystemExit(f"error: --data-x of shape {x.shape} has no features: give each sample one value or more")
    if x.ndim == 4 and min(x.shape[2:]) < 2:
        raise SystemExit(f"error: --data-x images of {x.shape[2]}x{x.shape[3]} pixels: the trunk needs 2x2 or more")
    x = scale(x.astype(np.float64)).astype(np.float32)  # scaled in float64: large offsets survive (timestamps)
    if args.quick:
        keep = np.random.default_rng(args.seed).permutation(len(x))[:400]
        x, y = x[keep], (y[keep] if y is not None else None)
    if y is not None:
        y = np.unique(np.asarray(y), return_inverse=True)[1].reshape(-1)
    if y is None and not args.k:
        raise SystemExit("error: --data-x without --data-y: give --k, the number of clusters (no classes to count)")
    k = args.k or int(y.max()) + 1
    if k > len(x):
        raise SystemExit(f"error: --k {k} is more clusters than the {len(x)} samples; give --k {len(x)} or fewer")
    return Data(torch.from_numpy(x).contiguous(), y, k)


def _load_npy(path, flag: str) -> np.ndarray:
    try:
        array = np.load(path)
    except Exception as err:  # noqa: BLE001 -- whatever NumPy raises for a file it cannot read, said as one line
        raise SystemExit(f"error: {flag} {path}: {_load_error(path, err)}") from None
    if not isinstance(array, np.ndarray):  # np.load reads a .npz archive too, as a dict of arrays
        array.close()
        raise SystemExit(f"error: {flag} {path}: a .npz archive of {array.files}; save one array with np.save")
    return array


def _load_error(path, err: Exception) -> str:
    """What went wrong in ``np.load``, in the flags' terms: NumPy calls any file that is not a .npy "pickled (object)
    data" and tells the caller to pass ``allow_pickle=``, which the flags do not offer (so for an array of Python
    objects), and an empty file or a garbled header raised EOFError or tokenize's TokenError, not caught."""
    if isinstance(err, OSError):
        return str(err)  # no such file, a directory, no permission: NumPy's message names the cause
    with open(path, "rb") as f:
        is_npy = f.read(6) == b"\x93NUMPY"
    if not is_npy:
        return "not a .npy file (np.save writes one; a CSV file: np.save('x.npy', np.loadtxt('x.csv', delimiter=',')))"
    if "allow_pickle" in str(err):
        return (
            "an array of Python objects (dtype object), which is not read (loading it could run code); save "
            f"numbers (labels may also be strings): np.save({str(path)!r}, np.asarray(array, dtype=float))"
        )
    return f"cannot read it as a .npy file ({type(err).__name__}: {err}); write it again with np.save"


def batches(n: int, batch_size: int, gen: torch.Generator, drop_last: bool = True):
    """Yield index tensors of a fresh random permutation of range(n)."""
    perm = torch.randperm(n, generator=gen)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for i in range(0, stop, batch_size):
        yield perm[i : i + batch_size]


# ------------------------------------------------------------------------------------------------ augmentations


class Augment:
    """Random affine jitter (rotation, scale, shear, shift) plus gaussian noise, for small images in [0, 1].

    ``out_size`` smaller than the input together with ``zoom`` > 1 gives SwAV's small multi-crop views: a random
    sub-window, resampled to fewer pixels. Vectors (N, D) only get the noise.
    """

    def __init__(
        self,
        rotate: float = 12.0,
        scale: tuple = (0.9, 1.1),
        shear: float = 0.15,
        shift: float = 1.0,
        noise: float = 0.05,
    ):
        self.rotate, self.scale, self.shear, self.shift, self.noise = rotate, scale, shear, shift, noise

    def __call__(
        self, x: torch.Tensor, gen: torch.Generator, out_size: int | None = None, zoom: float = 1.0
    ) -> torch.Tensor:
        if x.dim() == 4:  # out_size: the small views' shorter side; the aspect ratio is kept
            x = self._affine(x, gen, out_size, zoom)
        return x + self.noise * torch.randn(x.shape, generator=gen)

    def _affine(self, x: torch.Tensor, gen: torch.Generator, out_size: int | None, zoom: float) -> torch.Tensor:
        n, (h, w) = len(x), x.shape[-2:]
        side = min(h, w)
        out_h, out_w = (h, w) if out_size is None else (round(h * out_size / side), round(w * out_size / side))

        def uniform(lo, hi):
            return lo + (hi - lo) * torch.rand(n, generator=gen)

        angle = uniform(-self.rotate, self.rotate) * math.pi / 180
        s = uniform(*self.scale) * zoom  # > 1 zooms in: the view covers a smaller window of the image
        shear = uniform(-self.shear, self.shear)
        max_shift = 2 * self.shift / side + (1 - 1 / zoom)  # in grid units; a zoomed window may sit anywhere
        tx, ty = uniform(-max_shift, max_shift), uniform(-max_shift, max_shift)
        cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
        theta = torch.stack([torch.stack([cos, -sin + shear, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (N, 2, 3)
        grid = F.affine_grid(theta, [n, x.shape[1], out_h, out_w], align_corners=False)
        return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


# -------------------------------------------------------------------------------------------------------- model


class Standardize(nn.Module):
    """Subtract the data set's mean and divide by its std (one scalar each: valid for any crop size)."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", x.mean())
        self.register_buffer("std", x.std().clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def make_trunk(data: Data, width: int = 32, dim: int = 128) -> nn.Module:
    """A small convnet for images (any input size >= 4 px: multi-crop safe) or an MLP for vectors; output (N, dim)."""
    if data.is_image:
        body = nn.Sequential(
            conv_block(data.x.shape[1], width),
            conv_block(width, 2 * width),
            nn.MaxPool2d(2),
            conv_block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * width, dim, bias=False),
        )
    else:
        d = data.x.shape[1]
        body = nn.Sequential(
            nn.Linear(d, 8 * width, bias=False),
            nn.BatchNorm1d(8 * width),
            nn.ReLU(inplace=True),
            nn.Linear(8 * width, dim, bias=False),
        )
    return nn.Sequential(Standardize(data.x), body, nn.BatchNorm1d(dim), nn.ReLU(inplace=True))


@torch.no_grad()
def predict(fn, x: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Apply ``fn`` to un-augmented ``x`` in batches on ``device``; return the concatenated outputs on the CPU."""
    return torch.cat([fn(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def cosine_lr(opt: torch.optim.Optimizer, base_lr: float, step: int, total: int, warmup: int = 0) -> None:
    """Linear warm-up then cosine decay to zero."""
    lr = base_lr * (step + 1) / warmup if step < warmup else base_lr * 0.5 * (1 + math.cos(math.pi * step / total))
    for group in opt.param_groups:
        group["lr"] = lr


# ------------------------------------------------------------------------------------------------------ metrics


def matched_accuracy(y: np.ndarray, labels: np.ndarray, k: int | None = None) -> tuple[float, str]:
    """Accuracy after mapping clusters to classes: Hungarian one-to-one when K <= classes, else majority vote.
    ``k``: the number of clusters K (default: the largest label + 1); empty clusters count towards it."""
    n_cls, k = int(y.max()) + 1, max(k or 0, int(labels.max()) + 1)
    table = np.zeros((k, n_cls), dtype=np.int64)
    np.add.at(table, (labels, y), 1)
    if k <= n_cls:
        rows, cols = linear_sum_assignment(-table)
        return float(table[rows, cols].sum() / len(y)), "hungarian"
    return float(table.max(axis=1).sum() / len(y)), "majority"


def balance(labels: np.ndarray, k: int) -> float:
    """Largest cluster size over the fair share N / K (1.0 is perfectly balanced)."""
    return float(np.bincount(labels, minlength=k).max() / (len(labels) / k))


def cluster_metrics(labels, y: np.ndarray | None, k: int) -> dict:
    """NMI, ARI, matched accuracy (and how it was matched), balance and number of non-empty clusters."""
    labels = np.asarray(labels, dtype=np.int64)
    out = {"k": k, "balance": balance(labels, k), "used_clusters": int(len(np.unique(labels)))}
    if y is not None:
        acc, how = matched_accuracy(y, labels, k)
        out.update(
            nmi=float(normalized_mutual_info_score(y, labels)),
            ari=float(adjusted_rand_score(y, labels)),
            acc=acc,
            acc_mapping=how,
        )
    return out


def kmeans_baseline(data: Data, seed: int) -> dict:
    """k-means (scikit-learn, n_init=10) on the inputs as the trainers see them (pixels in [0, 1], or standardised
    features), same run, same data, same K as the trainer's (``--k``, by default the number of true classes)."""
    k = data.n_clusters
    start = time.perf_counter()
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(data.flat)
    return {
        "method": "k-means on raw pixels" if data.is_image else "k-means on standardised features",
        **cluster_metrics(labels, data.y, k),
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------------------ reporting


def format_table(rows: list[dict]) -> str:
    """A plain-text results table, one row per method."""
    head = f"{'method':<38} {'K':>4} {'NMI':>6} {'ARI':>6} {'acc':>6} {'balance':>8} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        num = {key: f"{r[key]:.3f}" if key in r else "  -  " for key in ("nmi", "ari", "acc")}
        mark = "*" if r.get("acc_mapping") == "majority" else " "
        lines.append(
            f"{r['method']:<38} {r['k']:>4} {num['nmi']:>6} {num['ari']:>6} {num['acc']:>5}{mark} "
            f"{r['balance']:>8.2f} {r['seconds']:>8.1f}"
        )
    lines.append(
        "acc: Hungarian-matched accuracy (* = K > classes: each cluster mapped to its majority class). "
        "balance: largest cluster / fair share N/K."
    )
    return "\n".join(lines)


@contextlib.contextmanager
def solver_errors(epsilon_flag: str):
    """otlabel's errors for what a trainer handed it (a temperature too small for the model's scores, NaN logits
    from a diverged run) as one error line, saying which flag sets epsilon, instead of a traceback from the middle
    of training. Any other exception passes through unchanged."""
    try:
        yield
    except ValueError as err:
        frames = [frame for frame, _ in traceback.walk_tb(err.__traceback__)]
        if not frames or not frames[-1].f_globals.get("__name__", "").startswith("otlabel"):
            raise
        raise SystemExit(f"error: otlabel refused a pseudo-labelling step (epsilon is set by {epsilon_flag}): {err}"
                         ) from None  # fmt: skip


def finish(name: str, args: argparse.Namespace, rows: list[dict], state: dict) -> dict:
    """Print the table; with ``--out`` write <name>_results.json and the checkpoint <name>.pt. Return the results."""
    print(format_table(rows))
    if args.quick:  # one epoch on 400 samples often collapses (SwAV: NMI 0, balance 10.00): not a result to report
        print("--quick: a smoke test (one short epoch on 400 samples); these figures are not results.")
    results = {
        "trainer": name,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "torch": torch.__version__,
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}_results.json").write_text(json.dumps(results, indent=2))
        torch.save({**state, "args": results["args"]}, args.out / f"{name}.pt")  # plain types: torch.load's default
    return results
