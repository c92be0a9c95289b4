"""Image files on the host: read as RGB, resize, write PNG atomically.

One place for what every stage does to image files, so that errors always
name the file and no stage can leave a half-written image under its final
name.
"""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np


def read_rgb(path: str) -> np.ndarray:
  """Reads an image file as [H, W, 3] uint8 RGB.

  Raises:
    FileNotFoundError: the file does not exist (named).
    ValueError: OpenCV cannot decode it (named).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Image file not found: {path}")
  image = cv2.imread(path, cv2.IMREAD_COLOR_RGB)
  if image is None:
    raise ValueError(f"Cannot decode image file {path} (corrupt or not an "
                     "image format OpenCV reads).")
  return image


def resize(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Resizes an [H, W, C] uint8 image to size = (height, width).

  INTER_AREA when shrinking both sides (no aliasing), INTER_LINEAR
  otherwise. Returns the input itself when it already has that size.
  """
  h, w = int(size[0]), int(size[1])
  if h <= 0 or w <= 0:
    raise ValueError(f"resize: size must be positive (height, width), got "
                     f"{tuple(size)}.")
  if image.shape[:2] == (h, w):
    return image
  shrink = image.shape[0] >= h and image.shape[1] >= w
  return cv2.resize(image, (w, h), interpolation=(
      cv2.INTER_AREA if shrink else cv2.INTER_LINEAR))


def write_png_atomic(path: str, image: np.ndarray) -> None:
  """Writes [H, W, 3] uint8 RGB to `path` as PNG via a temporary file in the
  same folder and `os.replace`, creating the folder if needed."""
  ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  if not ok:
    raise ValueError(f"PNG encoding failed for {path}.")
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    f.write(data.tobytes())
  os.replace(tmp, path)
