"""Smoke tests of the example trainers (one short ``--quick`` epoch each) and of their shared helpers.

The full training runs and their targets are documented in ``examples/README.md``; they are not part of the suite.
"""

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import common  # noqa: E402
import deepcluster  # noqa: E402
import sela  # noqa: E402
import swav  # noqa: E402

QUICK = ["--quick", "--no-progress"]


def run(trainer, tmp_path, *flags):
    """Run a trainer's main() quickly, check the files it writes, return (results, checkpoint)."""
    results = trainer.main([*QUICK, "--out", str(tmp_path), *flags])
    name = results["trainer"]
    assert json.loads((tmp_path / f"{name}_results.json").read_text())["rows"] == results["rows"]
    ckpt = torch.load(tmp_path / f"{name}.pt", weights_only=False)
    learned, kmeans = results["rows"]
    assert kmeans["method"] == "k-means on raw pixels"
    for row in results["rows"]:
        for key in ("nmi", "ari", "acc", "balance"):
            assert math.isfinite(row[key]), (row["method"], key, row[key])
    assert all(math.isfinite(loss) for loss in learned["losses"]), learned["losses"]
    return results, ckpt


def assert_balanced(labels: torch.Tensor, k: int, slack: float = 1.2):
    """Every cluster used, none above ``slack`` times its fair share."""
    counts = torch.bincount(labels.flatten(), minlength=k)
    assert counts.min() > 0 and counts.max() <= slack * len(labels.flatten()) / k, counts.tolist()


def test_sela_quick(tmp_path, capsys):
    results, ckpt = run(sela, tmp_path, "--heads", "2", "--k", "12")
    # One short epoch collapses often (SwAV: NMI 0, balance 10.00): the table says its figures are not results
    assert "--quick: a smoke test" in capsys.readouterr().out.split("balance: largest cluster")[1]
    assert ckpt["labels"].shape == (2, 400)  # (T, N): one label per head and sample
    for head_labels in ckpt["labels"]:  # after 3 SGD steps the logits are nearly flat: the argmax of a soft plan
        assert_balanced(head_labels, 12, slack=3.0)
    assert ckpt["cluster_potentials"].shape == (2, 12)
    assert len(results["rows"][0]["label_steps"]) == 2
    assert results["rows"][0]["acc_mapping"] == "majority"  # K = 12 > 10 classes


def test_only_quick_runs_say_their_figures_are_not_results(capsys):
    rows = [{"method": "k-means on raw pixels", "k": 10, "nmi": 0.7, "ari": 0.6, "acc": 0.8, "balance": 1.2,
             "seconds": 0.1}]  # fmt: skip
    common.finish("sela", sela.parse_args([]), rows, {})
    assert "smoke test" not in capsys.readouterr().out


def test_sela_self_label_is_balanced():
    args = sela.parse_args(["--quick"])
    data = common.load_data(args)
    torch.manual_seed(0)
    model = sela.SeLaNet(common.make_trunk(data), 128, n_heads=3, k=10)
    with torch.no_grad():
        for head in model.heads:
            head.weight.mul_(30)  # decisive heads, as after training: hard labels follow the balanced plan
    res = sela.self_label(model, data.x, args, "cpu", init=None)
    assert res.labels.shape == (3, 400) and res.cluster_potentials.shape == (3, 10)
    torch.testing.assert_close(res.codes.mean(1), torch.full((3, 10), 0.1), atol=2e-3, rtol=0)
    for head_labels in res.labels:
        assert_balanced(head_labels, 10)


def test_sela_is_deterministic(tmp_path):
    first = sela.main([*QUICK, "--seed", "3"])["rows"][0]
    second = sela.main([*QUICK, "--seed", "3"])["rows"][0]
    assert first["losses"] == second["losses"] and first["nmi"] == second["nmi"]


def test_swav_quick_multicrop_queue(tmp_path):
    results, ckpt = run(
        swav, tmp_path, "--small-crops", "2", "--queue-length", "64", "--queue-start", "0", "--batch-size", "100"
    )
    assert ckpt["model"]["prototypes.weight"].shape == (10, 32)
    assert results["rows"][0]["last_sinkhorn_iters"] == 3


def test_swav_codes_are_balanced_soft_assignments():
    args = swav.parse_args(["--converged"])
    assigner = swav.Assigner(args, n_views=2, proj_dim=8, device="cpu")
    gen = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(2, 200, 8, generator=gen), dim=-1)  # (V, B, D)
    prototypes = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)  # (K, D)
    q = assigner.codes(z, z @ prototypes.T, prototypes, use_queue=False)
    assert q.shape == (2, 200, 5)
    torch.testing.assert_close(q.sum(-1), torch.ones(2, 200))
    torch.testing.assert_close(q.mean(1), torch.full((2, 5), 0.2), atol=1e-3, rtol=0)  # equipartition


def test_deepcluster_quick(tmp_path):
    _, ckpt = run(deepcluster, tmp_path)
    assert ckpt["labels"].shape == (400,)


def test_deepcluster_balanced_quick(tmp_path):
    results, ckpt = run(deepcluster, tmp_path, "--balanced")
    assert_balanced(ckpt["labels"], 10)
    assert results["rows"][0]["balance"] <= 1.2


def test_user_arrays_vectors(tmp_path):
    gen = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = gen.normal(size=(120, 5)) + 4 * y[:, None]  # (N, D), D not square: the MLP trunk and noise only
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    results = sela.main(
        [*QUICK, "--data-x", str(tmp_path / "x.npy"), "--data-y", str(tmp_path / "y.npy"), "--batch-size", "32"]
    )
    assert results["rows"][0]["k"] == 3 and results["rows"][1]["k"] == 3


def test_user_vectors_are_standardised_per_feature(tmp_path):
    """Tabular columns come in their own units: one global min/max (the old scaling) let a noisy column of scale
    1,000 flatten the informative ones, and k-means on the inputs found nothing (NMI 0.0); standardised per
    column it finds the 3 groups. Images keep the global [0, 1] scaling (digits' results unchanged)."""
    gen = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 60)
    x = np.concatenate([gen.normal(size=(180, 3)) + 4 * y[:, None], 1000 * gen.normal(size=(180, 1))], axis=1)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    args = sela.parse_args(["--data-x", str(tmp_path / "x.npy"), "--data-y", str(tmp_path / "y.npy")])
    data = common.load_data(args)
    assert data.x.dtype == torch.float32 and not data.is_image
    np.testing.assert_allclose(data.x.mean(0).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(data.x.std(0, unbiased=False).numpy(), 1, atol=1e-5)
    baseline = common.kmeans_baseline(data, 0)
    assert baseline["method"] == "k-means on standardised features" and baseline["nmi"] > 0.9, baseline
    digits = common.load_data(sela.parse_args([]))
    raw = __import__("sklearn.datasets").datasets.load_digits().data.astype(np.float32)
    assert digits.is_image and torch.equal(digits.x.reshape(len(raw), -1), torch.from_numpy(raw / 16))


def test_square_vectors_can_be_kept_as_vectors(tmp_path, capsys):
    """A square width of 16 or more is read as an image; 16 tabular columns are not a 4x4 picture, and there was
    no way to say so. ``--vectors`` keeps them vectors (standardised per column, an MLP trunk); it refuses arrays
    that are already images."""
    x = np.random.default_rng(0).normal(size=(40, 16)) * np.arange(1, 17)
    np.save(tmp_path / "x.npy", x)
    flags = ["--data-x", str(tmp_path / "x.npy"), "--k", "3"]
    assert common.load_data(sela.parse_args(flags)).is_image
    data = common.load_data(sela.parse_args([*flags, "--vectors"]))
    assert data.x.shape == (40, 16) and not data.is_image
    np.testing.assert_allclose(data.x.std(0, unbiased=False).numpy(), 1, atol=1e-5)
    np.save(tmp_path / "img.npy", x.reshape(40, 4, 4))
    with pytest.raises(SystemExit, match=r"--vectors reads \(N, D\) arrays as vectors; --data-x has shape"):
        common.load_data(sela.parse_args(["--data-x", str(tmp_path / "img.npy"), "--k", "3", "--vectors"]))


def test_matched_accuracy_and_balance():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert common.matched_accuracy(y, np.array([2, 2, 0, 0, 1, 1])) == (1.0, "hungarian")
    assert common.matched_accuracy(y, np.array([0, 1, 2, 2, 3, 3])) == (1.0, "majority")
    assert common.balance(np.array([0, 0, 0, 1]), 2) == 1.5


def test_augment_shapes_and_determinism():
    x = torch.rand(16, 1, 8, 8)
    aug = common.Augment()
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    assert aug(x, torch.Generator().manual_seed(1), out_size=6, zoom=1.4).shape == (16, 1, 6, 6)


def test_kmeans_reseeds_empty_clusters():
    x = torch.cat([torch.zeros(20, 2), torch.ones(20, 2)])  # 2 distinct points, duplicates: empty clusters appear
    x[::2] += 0.01 * torch.arange(20)[:, None]
    labels = deepcluster.torch_kmeans(x, 4, 10, torch.Generator().manual_seed(0))
    assert labels.shape == (40,) and len(torch.unique(labels)) == 4


@pytest.mark.parametrize(
    "trainer, flag, value, says",
    [
        (sela, "--heads", "0", "must be > 0"),
        (sela, "--lam", "0", "must be a finite number > 0"),
        (sela, "--epochs", "0", "must be > 0"),
        (sela, "--k", "0", "must be > 0"),
        (sela, "--lr", "nan", "must be a finite number > 0"),
        (swav, "--queue-length", "-1", "must be >= 0"),
        (swav, "--epsilon", "x", "expected a number"),
        (deepcluster, "--pca-dim", "0", "must be > 0"),
        (sela, "--lr", "inf", "must be a finite number > 0"),
        (sela, "--seed", "-1", "must be >= 0 and <= 4294967295"),
        (sela, "--batch-size", "1", "must be > 1"),
    ],
)
def test_flags_out_of_range_are_usage_errors(trainer, flag, value, says, capsys):
    """A flag outside its range stops at argument parsing, naming the flag (it was a traceback from training)."""
    with pytest.raises(SystemExit) as stop:
        trainer.main([*QUICK, flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and says in err, err


def test_help_shows_no_empty_defaults(capsys):
    with pytest.raises(SystemExit):
        sela.main(["--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: 25.0)" in out


@pytest.mark.parametrize("trainer", [sela, swav, deepcluster])
def test_help_shows_every_default(trainer, capsys):
    """argparse prints no default for a flag without help text: --epochs, --lr, --batch-size (which differ between
    the trainers), --seed and five more showed none."""
    with pytest.raises(SystemExit):
        trainer.main(["--help"])
    options = capsys.readouterr().out.split("options:")[1]
    no_default = ("-h", "--data-x", "--data-y", "--k ", "--out")
    entries = [e.strip() for e in re.split(r"\n  (?=-)", options) if e.strip()]
    missing = [e.split()[0] for e in entries if not e.startswith(no_default) and not re.search(r"\(default:\s", e)]
    assert not missing, missing


@pytest.mark.parametrize("device", ["foo", "cdua"])
def test_unknown_device_is_an_error_naming_the_flag(device):
    """--device foo was a RuntimeError traceback from torch.device."""
    with pytest.raises(SystemExit, match=f"error: --device {device}: Expected one of cpu, cuda"):
        common.setup(sela.parse_args(["--device", device]))


def test_out_that_is_a_file_stops_before_training(tmp_path):
    """It used to train the whole run, then fail in mkdir with FileExistsError's traceback."""
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="error: --out .*results.json: exists and is not a directory"):
        common.setup(sela.parse_args(["--out", str(tmp_path / "results.json")]))
    assert common.setup(sela.parse_args(["--out", str(tmp_path / "new")])).type == "cpu"


def test_out_that_cannot_be_created_stops_before_training(tmp_path):
    """An --out under a file (or on a read-only disk) trained the whole run, then failed in mkdir with a traceback."""
    (tmp_path / "data.npy").write_text("")
    with pytest.raises(SystemExit, match="error: --out .*data.npy/runs: cannot write there"):
        common.setup(sela.parse_args(["--out", str(tmp_path / "data.npy" / "runs")]))
    common.setup(sela.parse_args(["--out", str(tmp_path / "new" / "runs")]))
    assert (tmp_path / "new" / "runs").is_dir() and not any((tmp_path / "new" / "runs").iterdir())


def test_more_clusters_than_samples_stops_before_training():
    """--k 2000 on 1,797 digits trained a whole run, then failed in the k-means baseline."""
    with pytest.raises(SystemExit, match="--k 2000 is more clusters than the 1797 samples"):
        sela.main(["--no-progress", "--k", "2000"])


def test_checkpoint_loads_with_torch_load_defaults(tmp_path):
    """--out checkpoints held pathlib paths in args: torch.load's default weights_only=True refused them."""
    sela.main([*QUICK, "--out", str(tmp_path)])
    assert torch.load(tmp_path / "sela.pt")["args"]["out"] == str(tmp_path)


@pytest.mark.parametrize(
    "x, y, says",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 4.0]]), None, "contains NaN or inf"),
        (np.ones((1, 3)), None, "needs 2 or more"),
        (np.ones((5, 1, 1)), None, "the trunk needs 2x2"),
        (np.ones((5, 0)), None, "has no features"),  # trained a whole run, then k-means refused it
        (np.ones((5, 0, 4, 4)), None, "has no features"),  # images without a channel: numpy's zero-size error
        (np.ones(5), None, "must be (N, D)"),
        (np.ones((5, 3)), np.zeros((5, 2)), "--data-y must have shape (5,)"),
        (np.ones((5, 3)), np.zeros(4), "--data-y must have shape (5,)"),
        # NaN labels (unlabelled samples) became one more class of their own, silently, in NMI, ARI and accuracy
        (np.ones((5, 3)), np.array([0, 1, np.nan, 0, np.nan]), "--data-y contains NaN (first at index 2)"),
    ],
)
def test_bad_user_arrays_stop_before_training(tmp_path, x, y, says):
    np.save(tmp_path / "x.npy", x)
    flags = ["--data-x", str(tmp_path / "x.npy"), "--k", "1"]
    if y is not None:
        np.save(tmp_path / "y.npy", y)
        flags += ["--data-y", str(tmp_path / "y.npy")]
    with pytest.raises(SystemExit, match=__import__("re").escape(says)):
        common.load_data(sela.parse_args(flags))


@pytest.mark.parametrize("flag", ["--data-x", "--data-y"])
def test_npz_archives_stop_with_an_error(tmp_path, flag):
    """np.load reads a .npz as an archive, not an array: it was an AttributeError traceback from load_data."""
    np.save(tmp_path / "x.npy", np.ones((5, 3)))
    np.save(tmp_path / "y.npy", np.zeros(5))
    np.savez(tmp_path / "a.npz", samples=np.ones((5, 3)))
    paths = {"--data-x": tmp_path / "x.npy", "--data-y": tmp_path / "y.npy", flag: tmp_path / "a.npz"}
    flags = [part for key, path in paths.items() for part in (key, str(path))]
    with pytest.raises(SystemExit, match=f"error: {flag} .*a.npz: a .npz archive of \\['samples'\\]"):
        common.load_data(sela.parse_args(flags))


@pytest.mark.parametrize("flag", ["--data-x", "--data-y"])
def test_files_that_are_not_numeric_npy_arrays_stop_with_an_error_that_says_so(tmp_path, flag):
    """A CSV (or any file that is not a .npy) was refused with NumPy's "This file contains pickled (object) data ...
    load it unsafely using the allow_pickle= keyword", advice the flags cannot follow and that misnames the file; an
    array of Python objects only with "Object arrays cannot be loaded when allow_pickle=False"; an empty file or a
    garbled header was a traceback."""
    np.save(tmp_path / "x.npy", np.ones((5, 3)))
    np.save(tmp_path / "y.npy", np.zeros(5))
    np.savetxt(tmp_path / "a.csv", np.ones((5, 3)), delimiter=",")
    np.save(tmp_path / "obj.npy", np.array([1, "a", None, 2.0, 3], dtype=object), allow_pickle=True)
    (tmp_path / "empty.npy").write_bytes(b"")  # an EOFError traceback
    (tmp_path / "header.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f8'(  \n")  # tokenize's TokenError
    for bad, says in (("a.csv", r"a.csv: not a .npy file \(np.save writes one"), ("obj.npy", "Python objects"),
                      ("empty.npy", "not a .npy file"), ("header.npy", "cannot read it as a .npy file")):  # fmt: skip
        paths = {"--data-x": tmp_path / "x.npy", "--data-y": tmp_path / "y.npy", flag: tmp_path / bad}
        flags = [part for key, path in paths.items() for part in (key, str(path))]
        with pytest.raises(SystemExit, match=f"error: {flag} .*{says}") as stop:
            common.load_data(sela.parse_args(flags))
        assert "allow_pickle" not in str(stop.value.code)


def test_column_labels_and_float64_offsets(tmp_path):
    """(N, 1) labels are read as (N,); float64 columns with a large offset keep their information."""
    y = np.repeat(np.arange(2), 10)
    np.save(tmp_path / "x.npy", np.stack([1.7e9 + y + 0.01 * np.arange(20), np.arange(20.0)], 1))
    np.save(tmp_path / "y.npy", y[:, None])
    data = common.load_data(sela.parse_args(["--data-x", str(tmp_path / "x.npy"), "--data-y", str(tmp_path / "y.npy")]))
    assert data.y.shape == (20,) and len(np.unique(data.x[:, 0].numpy())) == 20


@pytest.mark.parametrize("size", [1e200, 1e-315])
def test_finite_data_of_any_magnitude_is_scaled_not_wiped(size):
    """Vectors of size 1e200 (their squares overflow) or 1e-315 (their variance underflows) were standardised to
    all zeros, silently (a constant column becomes 0); images of +-1e308 too (their range overflowed)."""
    x = np.random.default_rng(0).normal(size=(30, 3)) * np.array([1.0, 2.0, 3.0])
    want = common.scale(x)
    np.testing.assert_allclose(common.scale(x * size), want, rtol=1e-6 if size > 1 else 1e-3, atol=1e-6)
    images = np.linspace(-1, 1, 4 * 16).reshape(4, 1, 4, 4)
    np.testing.assert_allclose(common.scale(images * 1.7e308), common.scale(images), rtol=1e-12)


def test_non_square_images_keep_their_shape():
    x = torch.rand(4, 1, 6, 10)
    assert common.Augment()(x, torch.Generator().manual_seed(0)).shape == (4, 1, 6, 10)
    assert common.Augment()(x, torch.Generator().manual_seed(0), out_size=3, zoom=1.4).shape == (4, 1, 3, 5)


def test_matched_accuracy_maps_by_k_not_by_the_largest_label():
    y = np.repeat(np.arange(3), 4)
    first = common.matched_accuracy(y, np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]), k=4)
    renamed = common.matched_accuracy(y, np.array([0, 0, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3]), k=4)
    assert first == renamed


def test_sela_self_label_shifts_logits_per_sample(monkeypatch):
    """Trained heads at λ = 200 (`sela.py --lam 200 --epochs 30`) reached |logits| / ε > 3e3 and otlabel refused
    them mid-training; subtracting each sample's maximum changes no plan and keeps them in range."""
    seen = {}

    def spy(scores, **kw):
        seen["scores"] = scores
        return real(scores, **kw)

    real = sela.sinkhorn_assign
    monkeypatch.setattr(sela, "sinkhorn_assign", spy)
    args = sela.parse_args(["--quick", "--lam", "200"])
    data = common.load_data(args)
    torch.manual_seed(0)
    model = sela.SeLaNet(common.make_trunk(data), 128, n_heads=2, k=10)
    with torch.no_grad():
        model.heads[0].bias.fill_(50.0)
    sela.self_label(model, data.x, args, "cpu", init=None)
    assert torch.equal(seen["scores"].amax(-1), torch.zeros(2, 400))


def test_faiss_is_opt_in_and_not_with_balanced(capsys):
    """Plain and --balanced DeepCluster share the torch k-means unless --faiss is asked for (it used to be taken
    whenever importable, changing more than the assignment step in the ablation)."""
    assert not deepcluster.parse_args([]).faiss
    with pytest.raises(SystemExit) as stop:
        deepcluster.parse_args(["--faiss", "--balanced"])
    assert stop.value.code == 2 and "--faiss replaces the whole k-means" in capsys.readouterr().err


def test_sela_says_when_label_steps_outnumber_training_steps(tmp_path, capsys):
    """Label steps that round to the same training step are one: 5 asked for over 2 training steps ran 2, silently."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((40, 5)).astype(np.float32))
    flags = ["--data-x", str(tmp_path / "x.npy"), "--k", "2", "--epochs", "1", "--batch-size", "20", "--no-progress"]
    results = sela.main([*flags, "--label-steps", "5"])
    assert len(results["rows"][0]["label_steps"]) == 2
    assert "note: --label-steps 5 spread over 2 training steps: 2 run" in capsys.readouterr().err
    sela.main([*flags, "--label-steps", "1"])
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "trainer, flags, setter", [(sela, ["--lam", "1e7"], "--lam: 1/λ"), (swav, ["--epsilon", "1e-7"], "--epsilon")]
)
def test_a_temperature_otlabel_refuses_is_an_error_line(trainer, flags, setter):
    """Too small an epsilon for the model's scores stopped the trainer with a traceback from mid-training; otlabel's
    message now comes as the trainer's error, naming the flag that sets epsilon. (DeepCluster's shifted distances
    have every row and column maximum at 0, which the range check accepts at any epsilon: it warns instead.)"""
    with pytest.raises(SystemExit) as stop:
        trainer.main([*QUICK, *flags])
    message = str(stop.value.code)
    assert message.startswith(f"error: otlabel refused a pseudo-labelling step (epsilon is set by {setter}): scores / "
                              "epsilon reach"), message  # fmt: skip


def test_solver_errors_passes_other_exceptions_through():
    """Only otlabel's own ValueErrors become an error line: one raised elsewhere is a bug to see whole."""

    @common.solver_errors("--epsilon")
    def fails():
        raise ValueError("not otlabel's")

    with pytest.raises(ValueError, match="not otlabel's"):
        fails()
