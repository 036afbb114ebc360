"""The black-box defense adapter: frozen classifier, FO-DS / ZO-DS / ZO-AE-DS, CLI, report.

Tiny sizes throughout (digits, 64 training images, a 77-parameter denoiser, n = 20 noisy samples);
the real comparison lives in docs/RESULTS.md, produced by the CLI.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepzero_oracle import CGE, LocalBlackBox, ModuleOracle
from deepzero_oracle.estimators.chain import ChainRule
from deepzero_oracle.adapters.defense.classifier import (
    frozen_blackbox,
    numpy_classifier_fn,
    train_classifier,
    whitebox_classifier,
)
from deepzero_oracle.adapters.defense.certification import LOG_COLUMNS, certify_front
from deepzero_oracle.adapters.defense.cli import register
from deepzero_oracle.adapters.defense.denoiser import Decoder, Denoiser, Encoder
from deepzero_oracle.adapters.defense.fronts import build_front, load_front, smoothed_pipeline
from deepzero_oracle.adapters.defense.oracles import ZOAEOracle
from deepzero_oracle.adapters.defense.training import DefenseConfig, train_defense
from deepzero_oracle.common.datasets import load_dataset
from deepzero_oracle.errors import SettingsMismatch
from deepzero_oracle.stats import proportion_interval

TINY = dict(dataset="digits", sigma=0.25, epochs=1, pretrain_epochs=1, ae_epochs=1, max_train=64, width=4,
            depth=2, batch_size=32)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    """A digits classifier trained for 2 epochs (enough to be far above chance)."""
    path = tmp_path_factory.mktemp("clf") / "classifier-digits.pt"
    meta = train_classifier("digits", path, epochs=5, channels=(8, 8), max_train=600, batch_size=32,
                            lr=1e-2, progress=False)
    assert meta["test_accuracy"] > 0.5
    return path


class QueryOnly:
    """The classifier as a test-side black box: numpy in, numpy out, nothing else reachable."""

    def __init__(self, path):
        fn = numpy_classifier_fn(path)
        self.seen = 0

        def classify(x):
            # A tensor here would mean someone bypassed the numpy boundary (and could carry a graph).
            assert isinstance(x, np.ndarray), f"the classifier got {type(x).__name__}, not a numpy array"
            self.seen += len(x)
            return fn(x)

        self.__dict__["_box"] = LocalBlackBox(classify, numpy=True)

    def __call__(self, x):
        return self.__dict__["_box"](x)

    def __getattr__(self, name):  # parameters, state_dict, fn, named_modules: all refused
        raise AttributeError(f"black box: {name!r} is not accessible, only queries are")


def test_frozen_classifier_is_query_only(clf):
    box = frozen_blackbox(clf)
    assert not hasattr(box, "parameters") and not hasattr(box.fn, "parameters")
    assert not isinstance(box, nn.Module) and not isinstance(box.fn, nn.Module)
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    out = box(x * 1.0)
    assert out.shape == (4, 10) and not out.requires_grad
    with pytest.raises(RuntimeError):
        torch.autograd.grad(out.sum(), x)
    # The engine refuses to back-propagate through it as well.
    oracle = ModuleOracle(Denoiser(1, 4, 2), F.cross_entropy, blackbox=box).bind(x.detach(), torch.zeros(4).long())
    with pytest.raises(NotImplementedError, match="not differentiable"):
        oracle.autograd_gradient(oracle.theta())
    guarded = QueryOnly(clf)
    with pytest.raises(AttributeError):
        guarded.parameters()
    # Same answers as the white-box weights (the black box really is that classifier).
    data = load_dataset("digits")
    with torch.no_grad():
        want = whitebox_classifier(clf)(data.x_test[:50])
    assert torch.allclose(guarded(data.x_test[:50]), want, atol=1e-6)


@pytest.mark.parametrize("method", ["zo-ds", "zo-ae-ds"])
def test_zo_methods_only_query_the_black_box(clf, tmp_path, method):
    before = _sha(clf)
    box = QueryOnly(clf)
    info = train_defense(DefenseConfig(method=method, **TINY), box, tmp_path / method, progress=False)
    # Every image the classifier saw went through the counted black box, plus the final
    # clean-accuracy check on (up to) 500 test images.
    assert box.seen == info["blackbox_images"] + len(load_dataset("digits").x_test[:500])
    assert info["queries"] > 0 and _sha(clf) == before


@pytest.mark.parametrize("method", ["fo-ds", "zo-ds", "zo-ae-ds"])
def test_each_method_trains_and_certifies(clf, tmp_path, method):
    out = tmp_path / method
    cfg = DefenseConfig(method=method, **TINY)
    info = train_defense(cfg, frozen_blackbox(clf), out, whitebox=whitebox_classifier(clf), progress=False)
    assert info["method"] == method and (out / "front.pt").exists()
    stab = torch.load(out / "stab" / "checkpoint.pt", weights_only=True)
    assert stab["epoch"] == 1 and stab["step"] == 2  # 64 images, batch 32
    if method == "zo-ds":
        # zo-grasp: 2 x 193 RGE queries; labels: 64; CGE: 2 steps x (kept coordinates + 1).
        assert info["queries"] > 2 * 193 + 64
        # Each CGE query sends the whole batch of 32 through the black box (plus 64 label images).
        assert info["blackbox_images"] >= 64 + 32 * stab["oracle"]["queries"]
    if method == "zo-ae-ds":
        latent = info["config"]["latent"] or 16
        assert info["queries"] == 64 + 2 * (2 * latent * 32)  # labels + 2 steps x 2 x latent x batch
        ae = torch.load(out / "ae" / "checkpoint.pt", weights_only=True)["learner"]
        front_sd = torch.load(out / "front.pt", weights_only=True)
        for k, v in ae.items():  # the decoder stays as pre-trained ("1." is the decoder)
            if k.startswith("1."):
                assert torch.equal(front_sd["decoder." + k[2:]], v)
    front, config = load_front(out)
    assert config.method == method
    run = certify_front(front, frozen_blackbox(clf), "digits", 0.25, n0=10, n=20, max_examples=3,
                        progress=False, log_path=out / "certify.tsv")
    assert run.queries == 3 * 30 and len(run.rows) == 3
    assert all(r["radius"] >= 0 for r in run.rows)


def test_mse_objective_needs_no_queries(clf, tmp_path):
    box = QueryOnly(clf)
    info = train_defense(DefenseConfig(method="zo-ds", objective="mse", **TINY), box, tmp_path / "m",
                         progress=False)
    assert info["queries"] == 0 and info["blackbox_images"] == 0
    with pytest.raises(ValueError, match="objective"):
        DefenseConfig(objective="bogus").check()
    with pytest.raises(ValueError, match="white-box"):
        train_defense(DefenseConfig(method="fo-ds", **TINY), box, tmp_path / "f", progress=False)


def test_latent_cge_matches_autograd_chain_rule():
    """ZO-AE-DS's estimate = exact gradient when the 'black box' happens to be differentiable."""
    torch.manual_seed(0)
    learner = nn.Sequential(Denoiser(1, 4, 2), Encoder(8, 6)).double()
    decoder = Decoder(8, 6).double()
    head = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    x, y = torch.rand(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (5,))
    oracle = ZOAEOracle(learner, lambda z: decoder(z), lambda im: head(im)).bind(x, y)
    est = ChainRule(CGE(mu=1e-5, difference="central")).estimate(oracle, oracle.theta())
    assert oracle.queries == 2 * 6 * 5  # central differences, per image
    params = list(learner.parameters())
    exact = torch.autograd.grad(F.cross_entropy(head(decoder(learner(x))), y), params)
    exact = torch.cat([g.reshape(-1) for g in exact])
    assert torch.allclose(est, exact, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", ["zo-ds", "zo-ae-ds"])
def test_smoothed_pipeline_runs_the_front_channels_last_with_the_same_values(method):
    torch.manual_seed(0)
    front = build_front(DefenseConfig(method=method), (1, 28, 28))
    seen = []

    def head(images):  # the classifier sees the usual layout
        seen.append(images.is_contiguous())
        return images.flatten(1)[:, :10]

    x = torch.rand(7, 1, 28, 28)
    with torch.no_grad():
        expected = head(front(x))
    assert torch.allclose(smoothed_pipeline(front, head)(x), expected, rtol=0, atol=1e-6)
    assert all(seen)
    assert all(p.is_contiguous() for p in front.parameters())  # the caller's front is left as it was


def test_zo_ds_local_equals_grpc(clf, tmp_path):
    from deepzero_oracle.blackbox import GrpcBlackBox
    from deepzero_oracle.server import serve_blackbox

    fn = numpy_classifier_fn(clf)
    cfg = dict(TINY, objective="stab")
    local = train_defense(DefenseConfig(method="zo-ds", **cfg), LocalBlackBox(fn, numpy=True), tmp_path / "local",
                          progress=False)
    with serve_blackbox(fn, port=0, numpy=True, model_name="clf") as server:
        with GrpcBlackBox(server.address, model="clf", timeout=60) as box:
            remote = train_defense(DefenseConfig(method="zo-ds", **cfg), box, tmp_path / "grpc", progress=False)
    assert local["queries"] == remote["queries"] and local["blackbox_images"] == remote["blackbox_images"]
    a = torch.load(tmp_path / "local" / "front.pt", weights_only=True)
    b = torch.load(tmp_path / "grpc" / "front.pt", weights_only=True)
    assert a.keys() == b.keys() == Denoiser(1, TINY["width"], TINY["depth"]).state_dict().keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _cli(argv):
    parser = argparse.ArgumentParser(prog="deepzero-oracle")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_train_certify_report_json(clf, tmp_path, capsys):
    root = tmp_path / "runs"
    common = ["--classifier", "local", "--classifier-path", str(clf), "--quiet"]
    assert _cli(["defense", "train", "--method", "zo-ds", *common, "--dataset", "digits", "--sigma", "0.25",
                 "--objective", "stab", "--epochs", "1", "--max-train", "32", "--width", "4", "--depth", "2",
                 "--out", str(root / "zo-ds")]) == 0
    cert = ["--n0", "10", "--n", "20", "--alpha", "0.001", "--max-examples", "4"]
    assert _cli(["defense", "certify", "--method", "zo-ds", *common, *cert, "--out", str(root / "zo-ds")]) == 0
    assert _cli(["defense", "certify", "--method", "none", *common, *cert, "--dataset", "digits",
                 "--sigma", "0.25", "--out", str(root / "none")]) == 0
    with pytest.raises(ValueError, match="n >= 10"):
        _cli(["defense", "certify", "--method", "none", *common, "--n", "9", "--dataset", "digits",
              "--sigma", "0.25", "--out", str(root / "bad")])
    capsys.readouterr()
    assert _cli(["defense", "report", "--root", str(root), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert list(table) == ["none", "zo-ds"]
    train_info = json.loads((root / "zo-ds" / "run.json").read_text())
    for method, row in table.items():
        assert list(row)[:5] == ["0.0", "0.25", "0.5", "0.75", "queries"]
        accs = [row[k] for k in ("0.0", "0.25", "0.5", "0.75")]
        assert all(0 <= a <= 1 for a in accs) and accs == sorted(accs, reverse=True)
        assert accs[0] in {i / 4 for i in range(5)}  # 4 examples
        # exact (Clopper-Pearson) 95% intervals over the 4 images, and a paired test on them
        assert row["n_images"] == 4
        for r, acc in zip(("0.0", "0.25", "0.5", "0.75"), accs):
            ci = proportion_interval(round(acc * 4), 4)
            assert row["ci95"][r] == pytest.approx([ci["low"], ci["high"]]) and ci["low"] <= acc <= ci["high"]
    vs = table["zo-ds"]["vs"]["none"]["0.0"]
    assert vs["n"] == 4 and 0 < vs["p"] <= 1 and vs["a_only"] + vs["b_only"] <= 4
    assert table["none"]["queries"] == 0 and table["zo-ds"]["queries"] == train_info["queries"] > 0
    text = (root / "report.md").read_text()
    assert text.count("| zo-ds |") == 2 and "95%" in text and "| zo-ds vs none |" not in text
    assert "| none vs zo-ds |" in text and "McNemar" in text
    assert (root / "certified_accuracy.png").stat().st_size > 0

    # An interrupted certify resumes where it stopped, and only with the same model and settings.
    log = root / "zo-ds" / "certify.tsv"
    whole = log.read_text()
    log.write_text("".join(whole.splitlines(keepends=True)[:3]))
    zo_cert = ["defense", "certify", "--method", "zo-ds", *common, *cert, "--out", str(root / "zo-ds")]
    assert _cli(zo_cert) == 0
    strip_time = lambda text: [line.rsplit("\t", 1)[0] for line in text.splitlines()]  # noqa: E731
    assert strip_time(log.read_text()) == strip_time(whole)
    with pytest.raises(SettingsMismatch, match="method: 'zo-ds' in the run, 'none' now"):
        _cli(["defense", "certify", "--method", "none", *common, *cert, "--dataset", "digits", "--sigma", "0.25",
              "--out", str(root / "zo-ds")])


def _fake_run(folder, method, radii, queries):
    """A certified run folder whose image i is certified at radius ``radii[i]`` (negative: wrong)."""
    folder.mkdir(parents=True)
    rows = ["\t".join(LOG_COLUMNS)] + [f"{i}\t0\t{0 if r >= 0 else 1}\t{abs(r)}\t{int(r >= 0)}\t0.1"
                                        for i, r in enumerate(radii)]
    (folder / "certify.tsv").write_text("\n".join(rows) + "\n")
    (folder / "certify.json").write_text(json.dumps({
        "method": method, "training_queries": queries, "training_blackbox_images": queries, "sigma": 0.5,
        "n": 100, "alpha": 0.001, "samples_per_second": 1.0}))


def test_compare_trains_certifies_and_pools_over_seeds_and_resumes(clf, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["defense", "compare", "--methods", "none,zo-ds", "--seeds", "0,1", "--classifier", "local",
            "--classifier-path", str(clf), "--dataset", "digits", "--sigma", "0.25", "--objective", "stab",
            "--epochs", "1", "--max-train", "32", "--width", "4", "--depth", "2", "--n0", "10", "--n", "20",
            "--max-examples", "4", "--quiet", "--json", "--out", str(out)]
    assert _cli(argv) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table["seeds"]) == {"0", "1"} and list(table["pooled"]) == ["none", "zo-ds"]
    assert table["pooled"]["zo-ds"]["n_images"] == 8  # 4 images x 2 seeds
    runs = {seed: json.loads((out / f"seed-{seed}" / "zo-ds" / "run.json").read_text()) for seed in (0, 1)}
    assert runs[0]["config"]["seed"] == 0 and runs[1]["config"]["seed"] == 1
    assert (out / "report.md").exists() and (out / "certified_accuracy.png").exists()
    kept = {p: _sha(p) for name in ("front.pt", "certify.tsv") for p in out.rglob(name)}
    assert len(kept) == 6
    assert _cli(argv) == 0  # a finished comparison continues to the same fronts and certificates
    assert json.loads(capsys.readouterr().out) == table
    assert {p: _sha(p) for p in kept} == kept
    with pytest.raises(ValueError, match="--methods: unknown"):
        _cli([*argv[:2], "--methods", "zo-xx", "--out", str(tmp_path / "bad")])


def test_report_over_seeds_pools_images_and_pairs_them_by_seed(tmp_path, capsys):
    # seed 0: zo-ds certifies images 0-3 at 0.6, fo-ds only 0-1; seed 1: both certify 0-1, and
    # fo-ds alone image 2. Pooled at r = 0.5: zo-ds alone certifies 2 (seed, image) pairs, fo-ds 1.
    _fake_run(tmp_path / "seed-0" / "zo-ds", "zo-ds", [0.6, 0.6, 0.6, 0.6], 10)
    _fake_run(tmp_path / "seed-0" / "fo-ds", "fo-ds", [0.6, 0.6, 0.1, 0.1], 2)
    _fake_run(tmp_path / "seed-1" / "zo-ds", "zo-ds", [0.6, 0.6, -0.3, 0.1], 30)
    _fake_run(tmp_path / "seed-1" / "fo-ds", "fo-ds", [0.6, 0.6, 0.6, 0.1], 4)
    _fake_run(tmp_path / "seed-1" / "none", "none", [0.1, 0.1, 0.1, 0.1], 0)
    assert _cli(["defense", "report", "--root", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"seeds", "pooled"} and list(result["seeds"]) == ["0", "1"]
    assert result["seeds"]["0"]["zo-ds"]["0.5"] == 1.0 and result["seeds"]["1"]["zo-ds"]["0.5"] == 0.5
    pooled = result["pooled"]
    assert list(pooled) == ["fo-ds", "zo-ds"]  # none was certified under seed 1 only
    assert pooled["zo-ds"]["n_images"] == 8 and pooled["zo-ds"]["0.5"] == 6 / 8
    assert pooled["zo-ds"]["queries"] == 20 and pooled["fo-ds"]["0.5"] == 5 / 8
    test = pooled["zo-ds"]["vs"]["fo-ds"]["0.5"]
    assert (test["a_only"], test["b_only"], test["n"]) == (2, 1, 8)
    assert test["p"] == pytest.approx(1.0)  # binomial(3, 1/2), two-sided: 2 vs 1 is no evidence
    ci = proportion_interval(6, 8)
    assert pooled["zo-ds"]["ci95"]["0.5"] == pytest.approx([ci["low"], ci["high"]])
    text = (tmp_path / "report.md").read_text()
    assert "Pooled over seeds 0, 1" in text and "## Seed 1" in text and "Not pooled" in text and "none" in text


def test_zo_ds_resume_follows_the_same_run(clf, tmp_path):
    """Stopping after one stab epoch and resuming to two gives the same denoiser and the same
    query / black-box image totals as two epochs straight."""
    cfg = dict(TINY, objective="stab", max_train=32)
    straight = train_defense(DefenseConfig(method="zo-ds", **dict(cfg, epochs=2)), frozen_blackbox(clf),
                             tmp_path / "straight", progress=False)
    train_defense(DefenseConfig(method="zo-ds", **dict(cfg, epochs=1)), frozen_blackbox(clf), tmp_path / "resumed",
                  progress=False)
    resumed = train_defense(DefenseConfig(method="zo-ds", **dict(cfg, epochs=2)), frozen_blackbox(clf),
                            tmp_path / "resumed", progress=False)
    assert resumed["queries"] == straight["queries"]
    assert resumed["blackbox_images"] == straight["blackbox_images"]
    a = torch.load(tmp_path / "straight" / "front.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "front.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
