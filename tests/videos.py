"""
Reproducible H.264 test videos with natural-looking motion: a camera that pans and zooms smoothly over a large
procedurally textured scene (fractal noise, detail at every scale like a photograph), with ellipses moving across.

    python tests/videos.py runs/videos    # the benchmark set: {360p,720p}_gop{60,125}/video.mp4, 10 s at 25 fps

Then `python data.py --bench runs/videos/720p_gop125` (BENCHMARKS.md). The tests use small ones.
"""

import os
import sys

import av
import numpy as np
from PIL import Image


def texture(rng, h, w):
    """Fractal noise, (h, w, 3) uint8: octaves from the whole image down to single pixels with nearly equal
    energy (a 1/f spectrum, as in natural images), colour varying over large scales only."""
    out = np.zeros((h, w, 3), np.float32)
    for octave in range(1, int(np.log2(max(h, w))) + 1):
        n = 2 ** octave
        noise = rng.normal(0, 1, (n * h // max(h, w) + 2, n * w // max(h, w) + 2, 4)).astype(np.float32)
        noise = noise[..., :3] * (0.6 if octave < 5 else 0.15) + noise[..., 3:]  # colour + brightness
        up = [np.asarray(Image.fromarray(c).resize((w, h), Image.BICUBIC)) for c in noise.transpose(2, 0, 1)]
        out += np.stack(up, -1) * n ** -0.2
    return (128 + 45 * (out - out.mean()) / out.std()).clip(0, 255).astype(np.uint8)


def make_video(path, height=360, gop=60, seconds=10.0, fps=25, seed=0, codec="libx264", options=None):
    """Write a 16:9 video of `height` rows with a key frame every `gop` frames (libx264's defaults otherwise:
    B-frames, CRF 23); `options` are passed to the encoder."""
    rng = np.random.default_rng(seed)
    width = height * 16 // 9 // 2 * 2
    scene = Image.fromarray(texture(rng, 2 * height, 2 * width))
    skin = texture(rng, height, width)  # the objects' texture
    objects = [(rng.uniform(0, 1, 2), rng.uniform(-0.15, 0.15, 2), rng.uniform(0.05, 0.15) * height,
                rng.integers(0, 256, 3)) for _ in range(4)]  # position, velocity (frames/s), radius, colour
    ys, xs = np.mgrid[:height, :width]
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.options = {"keyint_min": str(gop), "sc_threshold": "0", **(options or {})}
        for k in range(round(seconds * fps)):
            t = k / fps
            zoom = 0.7 + 0.2 * np.sin(2 * np.pi * t / 9)  # the part of the scene in view
            cy, cx = 0.5 + (1 - zoom) / 2 * np.sin(2 * np.pi * t / np.array([7, 11]) + [1, 0])
            box = np.array([cx - zoom / 2, cy - zoom / 2, cx + zoom / 2, cy + zoom / 2]) * (scene.size * 2)
            frame = np.array(scene.resize((width, height), Image.BILINEAR, box=tuple(box)))
            for p, v, r, colour in objects:
                y, x = (1 - np.abs((p + v * t) % 2 - 1)) * (height, width)  # bouncing off the borders
                inside = (ys - y) ** 2 + ((xs - x) / 1.5) ** 2 < r ** 2
                frame[inside] = (colour + skin[inside]) // 2
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


if __name__ == "__main__":
    for height in (360, 720):
        for gop in (60, 125):
            folder = os.path.join(sys.argv[1], f"{height}p_gop{gop}")
            os.makedirs(folder, exist_ok=True)
            make_video(os.path.join(folder, "video.mp4"), height, gop)
            print(folder)
