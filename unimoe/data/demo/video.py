"""Synthetic video paired with a piece of music (for video-to-music).

A small frame sequence whose *motion* follows the music's tempo (a disk orbits once per
bar and pulses on every beat, with a flash on downbeats) and whose *colour* follows its
mood and mode (hue per mood, brighter for major keys). A V2M model can therefore read
tempo and mood off the video. Saved as ``.npz`` with ``frames [F, H, W, 3] uint8`` and
``fps``.
"""

from __future__ import annotations

import colorsys
import random
from pathlib import Path

import numpy as np

from unimoe.atomic import atomic_path
from unimoe.data.demo.music import PieceParams

MOOD_HUES: dict[str, tuple[float, float]] = {
    # mood -> (hue in [0, 1), saturation)
    "calm": (0.50, 0.55),
    "happy": (0.13, 0.85),
    "sad": (0.62, 0.35),
    "energetic": (0.00, 0.95),
    "mysterious": (0.78, 0.70),
}


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, max(0.0, min(1.0, s)), max(0.0, min(1.0, v))), dtype=np.float32)


def render_frames(params: PieceParams, seconds: float, fps: float = 8.0, size: int = 32) -> np.ndarray:
    """Frames ``[F, size, size, 3]`` uint8 covering ``seconds`` of the piece."""
    rng = random.Random(params.seed ^ 0x5EED)
    hue, sat = MOOD_HUES[params.mood]
    hue = (hue + rng.uniform(-0.04, 0.04)) % 1.0
    bright = 1.0 if params.mode == "major" else 0.75
    beat_hz = params.tempo / 60.0
    bar_hz = beat_hz / params.beats_per_bar
    n = max(1, int(round(seconds * fps)))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    background = np.stack([_rgb(hue + 0.05 * y, sat * 0.6, 0.15 + 0.2 * y) for y in np.linspace(0, 1, size)])  # [H, 3]
    background = np.broadcast_to(background[:, None, :], (size, size, 3))
    fg = _rgb(hue, sat, bright)
    accent = _rgb(hue + 0.5, sat, bright)
    phase0 = rng.uniform(0, 2 * np.pi)
    direction = rng.choice((-1.0, 1.0))
    frames = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        t = i / fps
        beat_phase = (t * beat_hz) % 1.0
        pulse = np.exp(-4.0 * beat_phase)  # 1 on the beat, decaying
        downbeat = np.exp(-6.0 * ((t * bar_hz) % 1.0))
        angle = phase0 + direction * 2 * np.pi * bar_hz * t
        cx, cy = 0.5 + 0.28 * np.cos(angle), 0.5 + 0.28 * np.sin(angle)
        radius = 0.12 + 0.08 * pulse
        disk = np.clip((radius - np.hypot(xx - cx, yy - cy)) * size, 0.0, 1.0)[..., None]
        # a counter-rotating small satellite in the accent colour, speed ~ tempo
        a2 = -angle * 2
        sx, sy = 0.5 + 0.4 * np.cos(a2), 0.5 + 0.4 * np.sin(a2)
        sat_disk = np.clip((0.06 - np.hypot(xx - sx, yy - sy)) * size, 0.0, 1.0)[..., None]
        img = background * (1.0 + 0.6 * downbeat)
        img = img * (1 - disk) + fg * (0.7 + 0.3 * pulse) * disk
        img = img * (1 - sat_disk) + accent * sat_disk
        frames[i] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return frames


def save_video(path: Path, frames: np.ndarray, fps: float) -> None:
    """Write ``frames`` and ``fps`` as .npz atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, frames=frames, fps=np.float32(fps))
