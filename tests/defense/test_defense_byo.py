"""The defense on a classifier and images that only this file knows (none of the examples).

The classifier is a fixed template matcher over three classes of 8x8 images (a bright band at
the top, middle or bottom), defined here and reached three ways: in process
(``test_defense_byo:classify``), as a torch module (``test_defense_byo:template_module``, which
also allows FO-DS) and served by ``deepzero-oracle serve`` in a child process (``kserve://``,
``grpc://`` and ``kserve+http://``).
The images come as an ``.npz`` and as PNG folders.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from deepzero_oracle.adapters.defense.classifier import Classifier, open_classifier
from deepzero_oracle.adapters.defense.cli import register
from deepzero_oracle.adapters.defense.training import DefenseConfig, train_defense
from deepzero_oracle.apps.cli import main as cli_main
from deepzero_oracle.common.datasets import Dataset, load_data
from deepzero_oracle.errors import EXIT_UNREACHABLE, SettingsMismatch
from support.server_process import ServerProcess

CLASSES, SIDE = 3, 8
BANDS = [slice(3 * k, 3 * k + 2) for k in range(CLASSES)]  # rows 0-1, 3-4, 6-7


def _templates() -> np.ndarray:
    templates = np.zeros((CLASSES, SIDE * SIDE))
    for k, rows in enumerate(BANDS):
        mask = np.zeros((SIDE, SIDE))
        mask[rows] = 1
        templates[k] = (mask - mask.mean()).ravel()
    return templates


TEMPLATES = _templates()


def classify(images) -> np.ndarray:
    """``images [N, C, 8, 8]`` (NumPy or torch) -> logits ``[N, 3]`` float32 (channels averaged)."""
    x = np.asarray(images, dtype=np.float64)
    return (4.0 * x.mean(1).reshape(len(x), -1) @ TEMPLATES.T).astype(np.float32)


def classify_probabilities(images) -> np.ndarray:
    """The same classifier answering softmax probabilities ``[N, 3]``."""
    logits = classify(images).astype(np.float64)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def classify_two_classes(images) -> np.ndarray:
    """A classifier with the wrong number of classes for the data: ``[N, 2]``."""
    return classify(images)[:, :2]


class TemplateNet(nn.Module):
    """The template matcher as a torch module: ``[N, 1, 8, 8] -> [N, 3]``."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(SIDE * SIDE, CLASSES)
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(4.0 * TEMPLATES))
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(1).flatten(1))


template_module = TemplateNet()


def make_pixels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8-bit images ``[n, 8, 8]`` (uint8): a bright band on faint noise; labels ``[n]`` cycle 0..2."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    x = rng.uniform(0, 0.3, (n, SIDE, SIDE))
    for i, k in enumerate(y):
        x[i, BANDS[k]] += 0.6
    return np.round(x * 255).astype(np.uint8), y


def as_floats(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[n, 8, 8]`` -> ``[n, 1, 8, 8]`` float32 in [0, 1], exactly as the PNG reader scales them."""
    return pixels[:, None].astype(np.float32) / 255.0


def write_npz(path: Path, n_train: int = 48, n_test: int = 12, **override) -> Path:
    (pix_train, y_train), (pix_test, y_test) = make_pixels(n_train, 0), make_pixels(n_test, 1)
    arrays = dict(x_train=as_floats(pix_train), y_train=y_train, x_test=as_floats(pix_test), y_test=y_test)
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


CLASS_NAMES = ("a-top", "b-middle", "c-bottom")  # sorted as the labels: the reader numbers classes by name


def write_pngs(folder: Path, pixels: np.ndarray, labels: np.ndarray, names=CLASS_NAMES) -> None:
    from PIL import Image

    for i, (image, label) in enumerate(zip(pixels, labels)):
        (folder / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / names[label] / f"{i:03d}.png")


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    return write_npz(tmp_path_factory.mktemp("data") / "bands.npz")


def _cli(argv):
    parser = argparse.ArgumentParser(prog="deepzero-oracle")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


TINY = ["--objective", "stab", "--epochs", "1", "--width", "4", "--depth", "2", "--batch-size", "16", "--quiet"]
CERT = ["--n0", "10", "--n", "20", "--max-examples", "4", "--quiet"]


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def test_npz_and_png_folders_read_the_same_images(npz, tmp_path):
    from PIL import Image

    data = load_data(str(npz))
    assert data.classes == CLASSES and data.image_shape == (1, SIDE, SIDE) and len(data.x_train) == 48

    # DIR/train/<class>/ and DIR/test/<class>/: the same images, classes in sorted folder order.
    (pix_train, y_train), (pix_test, y_test) = make_pixels(48, 0), make_pixels(12, 1)
    names = CLASS_NAMES
    write_pngs(tmp_path / "split" / "train", pix_train, y_train, names)
    write_pngs(tmp_path / "split" / "test", pix_test, y_test, names)
    folder = load_data(str(tmp_path / "split"))
    assert folder.class_names == names and folder.classes == CLASSES

    def pairs(x, y):  # the folder's sets are shuffled: compare (label, image) pairs as sets
        return sorted((int(label), image.numpy().tobytes()) for image, label in zip(x, y))

    assert pairs(folder.x_train, folder.y_train) == pairs(data.x_train, data.y_train)
    assert pairs(folder.x_test, folder.y_test) == pairs(data.x_test, data.y_test)
    assert folder.y_test[:CLASSES].unique().numel() > 1  # the first test images mix the classes

    # DIR/<class>/: a seeded stratified 80/20 split; a colour file makes every image RGB.
    write_pngs(tmp_path / "flat", pix_train, y_train, names)
    Image.fromarray(np.stack([pix_train[0]] * 3, -1)).save(tmp_path / "flat" / names[0] / "rgb.png")
    flat = load_data(str(tmp_path / "flat"))
    assert flat.image_shape == (3, SIDE, SIDE) and len(flat.x_train) + len(flat.x_test) == 49
    assert torch.bincount(flat.y_test).tolist() == [4, 3, 3]  # 20% of 17 / 16 / 16, stratified
    assert torch.equal(load_data(str(tmp_path / "flat")).x_test, flat.x_test)  # seeded
    assert torch.equal(flat.x_train[:, 0], flat.x_train[:, 2])  # grey repeated into 3 channels


def _bad_npz(tmp_path, **override):
    return write_npz(tmp_path / "bad.npz", **override)


def _x(n=48):
    return as_floats(make_pixels(n, 0)[0])


def _folder(tmp_path, tweak):
    pixels, labels = make_pixels(12, 0)
    write_pngs(tmp_path / "imgs", pixels, labels)
    tweak(tmp_path / "imgs")
    return tmp_path / "imgs"


def _mixed_sizes(folder):
    from PIL import Image

    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / CLASS_NAMES[0] / "big.png")


BAD_DATA = {
    "missing key": (lambda p: _bad_npz(p, y_test=None), "lacks y_test"),
    "wrong rank": (lambda p: _bad_npz(p, x_train=_x()[:, 0]), r"rank 3.*x\[:, None\]"),
    "NaN": (lambda p: _bad_npz(p, x_train=np.where(np.arange(64).reshape(8, 8) == 5, np.nan, _x())),
            "NaN or Inf"),
    "outside [0, 1]": (lambda p: _bad_npz(p, x_test=as_floats(make_pixels(12, 1)[0]) * 255), "must lie in"),
    "integer pixels": (lambda p: _bad_npz(p, x_train=make_pixels(48, 0)[0][:, None]), "uint8"),
    "label out of range": (lambda p: _bad_npz(p, classes=np.int64(3), y_test=np.arange(12) % 4),
                           r"label 3, outside 0..2"),
    "negative label": (lambda p: _bad_npz(p, y_train=np.arange(48) % 3 - 1), "label -1"),
    "float labels": (lambda p: _bad_npz(p, y_train=(np.arange(48) % 3).astype(float)), "integers"),
    "train/test shapes": (lambda p: _bad_npz(p, x_test=np.zeros((12, 1, 4, 4), np.float32)), "one image shape"),
    "labels per image": (lambda p: _bad_npz(p, y_train=np.arange(40) % 3), r"must be \[48\]"),
    "mixed sizes": (lambda p: _folder(p, _mixed_sizes), "mixed image sizes.*10x10"),
    "empty class": (lambda p: _folder(p, lambda f: (f / "zzz").mkdir()), "empty class"),
    "one image": (lambda p: _folder(p, lambda f: [q.unlink() for q in sorted((f / CLASS_NAMES[0]).glob("*"))[1:]]),
                  "holds 1 image"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_images_are_refused_with_the_reason(tmp_path, case):
    make, message = BAD_DATA[case]
    with pytest.raises(ValueError, match=message):
        load_data(str(make(tmp_path)))


# ----------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------


class Declared:
    """A black box with KServe metadata; records the dtype of what it is sent."""

    def __init__(self, datatype="", shape=(), outputs=(), inputs=1):
        self.sent = None
        self._metadata = {"name": "m", "inputs": [{"name": f"in{i}", "datatype": datatype, "shape": list(shape)}
                                                  for i in range(inputs)],
                          "outputs": [{"name": "y", "datatype": "FP32", "shape": list(outputs)}] if outputs else []}

    def metadata(self):
        return self._metadata

    def __call__(self, x):
        self.sent = x.dtype
        return torch.from_numpy(classify(x.numpy()))


def test_metadata_decides_what_is_sent_and_is_checked_against_the_data(npz):
    images = load_data(str(npz)).x_train[:4]
    undeclared = Declared()
    assert Classifier("m", undeclared, CLASSES).check(images).input.datatype == "FP32"
    assert undeclared.sent == torch.float32
    fp64 = Declared("FP64", (-1, 1, SIDE, SIDE), outputs=(-1, CLASSES))
    classifier = Classifier("m", fp64, CLASSES).check(images)
    assert fp64.sent == torch.float64 and classifier.input.name == "in0"
    assert classifier(images).dtype == torch.float32  # answered in the images' dtype
    for box, message in ((Declared("UINT8"), "declared UINT8"), (Declared("FP32", (-1, 3, SIDE, SIDE)), "shape"),
                         (Declared(inputs=2), "takes 2 inputs"), (Declared(outputs=(-1, 10)), "3 classes")):
        with pytest.raises(ValueError, match=message):
            Classifier("m", box, CLASSES).check(images)


def test_probabilities_are_answered_as_their_logarithms(npz):
    data = load_data(str(npz))
    with open_classifier("test_defense_byo:classify_probabilities", data) as classifier:
        assert classifier.output == "probabilities" and classifier.whitebox is None
        scores = classifier(data.x_test)
    want = torch.from_numpy(classify_probabilities(data.x_test.numpy()))
    assert torch.allclose(scores.softmax(1), want, atol=1e-6)
    with open_classifier("test_defense_byo:classify", data) as classifier:
        assert classifier.output == "logits"
        assert torch.equal(classifier(data.x_test), torch.from_numpy(classify(data.x_test.numpy())))
    with open_classifier("test_defense_byo:template_module", data) as classifier:
        assert isinstance(classifier.whitebox, nn.Module) and classifier.output == "logits"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_input_fails_before_training_and_keeps_what_is_on_disk(npz, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "stab").mkdir(parents=True)
    kept = {out / "run.json": "{}", out / "front.pt": "front", out / "stab" / "checkpoint.pt": "ckpt"}
    for path, text in kept.items():
        path.write_text(text)
    bad = _bad_npz(tmp_path, x_train=np.full((48, 1, SIDE, SIDE), np.nan, np.float32))
    base = ["defense", "train", "--method", "zo-ds", "--out", str(out), "--restart", *TINY]
    cases = [
        (["--classifier", "test_defense_byo:classify", "--data", str(bad)], "NaN"),
        (["--classifier", "test_defense_byo:classify_two_classes", "--data", str(npz)], r"shaped \[8, 2\]"),
        (["--classifier", "test_defense_byo:no_such_function", "--data", str(npz)], "cannot load it"),
        (["--classifier", "local", "--data", str(npz)], "own images"),
        (["--classifier", "test_defense_byo:classify", "--data", str(tmp_path / "absent.npz")], "no such file"),
        (["--classifier", "test_defense_byo:classify", "--data", str(npz), "--method", "fo-ds"],
         "can only be queried"),
    ]
    for extra, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            _cli(base + extra)
    unreachable = f"kserve://127.0.0.1:{_free_port()}/classify"
    assert cli_main(base + ["--classifier", unreachable, "--data", str(npz)]) == EXIT_UNREACHABLE
    assert "UNAVAILABLE" in capsys.readouterr().err
    odd = Dataset("odd", torch.rand(6, 1, 7, 7), torch.arange(6) % 3, torch.rand(3, 1, 7, 7), torch.arange(3), 3)
    with pytest.raises(ValueError, match="even image sides"):  # what the front cannot take, before the restart
        train_defense(DefenseConfig(method="zo-ae-ds"), classify, out, data=odd, restart=True, progress=False)
    assert {p: p.read_text() for p in kept} == kept and sorted(p.name for p in out.iterdir()) == [
        "front.pt", "run.json", "stab"]


# ----------------------------------------------------------------------------------------------
# Every method, in process and served
# ----------------------------------------------------------------------------------------------


def test_every_method_on_an_in_process_classifier(npz, tmp_path, capsys):
    for method, spec in (("zo-ae-ds", "test_defense_byo:classify"), ("fo-ds", "test_defense_byo:template_module")):
        out = tmp_path / method
        assert _cli(["defense", "train", "--method", method, "--classifier", spec, "--data", str(npz),
                     "--max-train", "16", "--ae-epochs", "1", *TINY, "--out", str(out)]) == 0
        info = json.loads((out / "run.json").read_text())
        assert info["classifier"]["spec"] == spec and info["image_shape"] == [1, SIDE, SIDE]
        if method == "zo-ae-ds":  # clean labels + one step of central CGE in a 16-wide latent per image
            assert info["queries"] == 16 + 2 * 16 * 16
        assert _cli(["defense", "certify", "--method", method, *CERT, "--out", str(out)]) == 0
    # The run is bound to its data: other images in the same folder are refused, naming why.
    other = write_npz(tmp_path / "other.npz", n_train=24)
    with pytest.raises(SettingsMismatch, match="data_sha256"):
        _cli(["defense", "train", "--method", "zo-ae-ds", "--classifier", "test_defense_byo:classify",
              "--data", str(other), "--max-train", "16", "--ae-epochs", "1", *TINY,
              "--out", str(tmp_path / "zo-ae-ds")])
    with pytest.raises(ValueError, match="other images"):
        _cli(["defense", "certify", "--method", "fo-ds", "--data", str(other), *CERT, "--out", str(tmp_path / "fo-ds")])
    capsys.readouterr()
    assert _cli(["defense", "report", "--root", str(tmp_path), "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["fo-ds", "zo-ae-ds"]


def test_served_classifier_trains_and_certifies_like_the_in_process_one(tmp_path, capsys):
    """`deepzero-oracle serve test_defense_byo:classify` reached as kserve://: the same denoiser
    and the same certificates as calling the function in process; images from PNG folders."""
    (pix_train, y_train), (pix_test, y_test) = make_pixels(48, 0), make_pixels(12, 1)
    write_pngs(tmp_path / "pngs" / "train", pix_train, y_train)
    write_pngs(tmp_path / "pngs" / "test", pix_test, y_test)
    data = ["--data", str(tmp_path / "pngs")]
    runs = {"in-process": "test_defense_byo:classify"}
    here = Path(__file__).resolve()  # the child imports this file, which imports support.* from tests/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parents[1]), os.environ.get("PYTHONPATH", "")])}
    with ServerProcess("test_defense_byo:classify", "--http-port", "0", cwd=here.parent, env=env) as server:
        runs["served"] = f"kserve://127.0.0.1:{server.port}/classify"
        runs["served-grpc"] = f"grpc://127.0.0.1:{server.port}"
        runs["served-rest"] = f"kserve+http://{server.rest_url.removeprefix('http://')}/classify"
        for name, spec in runs.items():
            out = tmp_path / "runs" / name
            assert _cli(["defense", "train", "--method", "zo-ds", "--classifier", spec, *data, "--max-train", "24",
                         *TINY, "--out", str(out)]) == 0
            assert _cli(["defense", "certify", "--method", "zo-ds", *CERT, "--out", str(out)]) == 0
        assert _cli(["defense", "certify", "--method", "none", "--classifier", runs["served"], *data,
                     "--sigma", "0.25", *CERT, "--out", str(tmp_path / "runs" / "none")]) == 0
    def rows(name):  # certificates without their timing column
        return [line.rsplit("\t", 1)[0] for line in (tmp_path / "runs" / name / "certify.tsv").read_text().splitlines()]

    local = json.loads((tmp_path / "runs" / "in-process" / "run.json").read_text())
    b = torch.load(tmp_path / "runs" / "in-process" / "front.pt", weights_only=True)
    for name in ("served", "served-grpc", "served-rest"):  # kserve://, grpc:// and kserve+http:// alike
        served = json.loads((tmp_path / "runs" / name / "run.json").read_text())
        assert served["classifier"]["input"] == "images" and served["classifier"]["datatype"] == "FP32"
        assert served["queries"] == local["queries"] > 0 and served["blackbox_images"] == local["blackbox_images"]
        a = torch.load(tmp_path / "runs" / name / "front.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert rows(name) == rows("in-process") and len(rows(name)) == 5
    capsys.readouterr()
    assert _cli(["defense", "report", "--root", str(tmp_path / "runs"), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert list(table) == ["none", "zo-ds (in-process)", "zo-ds (served)", "zo-ds (served-grpc)", "zo-ds (served-rest)"]
    assert table["none"]["0.0"] > 0.5  # the template matcher is right on most noisy bands
