"""Reading pre-extracted video frames (the form the data pipeline accepts for v2m).

Decoding mp4 is left to the user's own tools: a manifest's ``video`` is a ``.npy`` array
``[F, H, W, 3]`` (uint8 0-255 or float 0-1) or an ``.npz`` with ``frames`` and optional
``fps``. Every failure names the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class VideoFileError(RuntimeError):
    """A video frame file is missing, unreadable or has the wrong shape or type."""


def load_video(path: str | Path) -> tuple[np.ndarray, float | None]:
    """Frames ``[F, H, W, 3]`` uint8 and the fps if the file stores one."""
    path = Path(path)
    if not path.is_file():
        raise VideoFileError(f"video file not found: {path}")
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                if "frames" not in data:
                    raise VideoFileError(f"video file {path} has no 'frames' array (keys: {', '.join(data.files)})")
                frames = data["frames"]
                fps = float(data["fps"]) if "fps" in data else None
        else:
            frames, fps = np.load(path), None
    except VideoFileError:
        raise
    except Exception as exc:
        raise VideoFileError(f"cannot read video file {path}: {exc}") from exc
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise VideoFileError(f"video file {path}: expected frames [F, H, W, 3] with F > 0, got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        if np.issubdtype(frames.dtype, np.floating) and np.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1:
            frames = (frames * 255 + 0.5).astype(np.uint8)
        else:
            raise VideoFileError(f"video file {path}: frames must be uint8 0-255 or float 0-1, got {frames.dtype}")
    return frames, fps
