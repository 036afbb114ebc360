"""Write scikit-learn's 8x8 digits as PNG files, one folder per class: OUT/<digit>/<index>.png.

    python export_digits.py data/digits-png

Stands in for "your own images": `defense train --data data/digits-png` reads the folder and,
as it has no train/ and test/ subfolders, splits it 80/20 (stratified, seeded).
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(out: str) -> None:
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        folder = Path(out) / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:04d}.png")
    print(f"wrote {len(pixels)} PNG files under {out}/<digit>/")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/digits-png")
