"""Image files on the host: read as RGB, resize, write PNG atomically.

One place for what every stage does to image files, so that errors always
name the file and no stage can leave a half-written image under its final
name.
"""

from __future__ import annotations

import os
import socket
from typing import Sequence

import cv2
import numpy as np
import PIL.Image


# What a complete file of these formats ends with (within its last KB:
# some writers append a trailer after the end marker).
_END_MARKERS = {b"\xff\xd8": (b"\xff\xd9", "JPEG end-of-image marker"),
                b"\x89PNG": (b"IEND", "PNG IEND chunk")}


def _truncation(path: str, data_head: bytes, data_tail: bytes,
                size: int) -> str:
  """Why a JPEG/PNG file (its first 4 and last 1024 bytes) is cut short,
  or "" when it is not."""
  for magic, (end, name) in _END_MARKERS.items():
    if data_head.startswith(magic) and end not in data_tail:
      return (f"Image file {path} is truncated ({size} bytes, no {name}): "
              f"copy it again from the source.")
  return ""


def probe(path: str) -> tuple[str, tuple[int, int]]:
  """(format, (height, width)) of an image file from its header and tail,
  without decoding the pixels: what a split's check reads of every file.

  Raises:
    FileNotFoundError: the file does not exist (named).
    ValueError: the file is cut short, or its header is not an image
      format Pillow recognises (named).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Image file not found: {path}")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(4)
    f.seek(max(0, size - 1024))
    tail = f.read()
  problem = _truncation(path, head, tail, size)
  if problem:
    raise ValueError(problem)
  try:
    with PIL.Image.open(path) as image:
      return image.format, (image.height, image.width)
  except (PIL.UnidentifiedImageError, OSError, SyntaxError) as e:
    raise ValueError(f"Image file {path} has no image header a decoder "
                     f"recognises ({e}).") from None


def read_rgb(path: str) -> np.ndarray:
  """Reads an image file as [H, W, 3] uint8 RGB.

  Raises:
    FileNotFoundError: the file does not exist (named).
    ValueError: the file is cut short (a JPEG without its end marker, a PNG
      without IEND: decoders fill the missing part with grey and carry
      on), or OpenCV cannot decode it (named).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Image file not found: {path}")
  data = np.fromfile(path, np.uint8)
  problem = _truncation(path, data[:4].tobytes(), data[-1024:].tobytes(),
                        data.size)
  if problem:
    raise ValueError(problem)
  image = cv2.imdecode(data, cv2.IMREAD_COLOR_RGB) if data.size else None
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
  # Host and pid: processes of a multi-host job share the folder.
  tmp = os.path.join(folder, f".{os.path.basename(path)}."
                     f"{socket.gethostname()}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    f.write(data.tobytes())
  os.replace(tmp, path)
