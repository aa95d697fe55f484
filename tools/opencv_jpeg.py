#!/usr/bin/env python3
"""OpenCV's JPEG pixels for tests/jpeg_opencv.rs.

    python tools/opencv_jpeg.py OUTDIR [FILE.jpg ...]

Writes into OUTDIR a set of generated JPEGs (baseline, progressive, optimised Huffman tables, 4:2:0,
4:2:2, 4:4:0, 4:1:1, 4:4:4, grey, restart markers, odd sizes, EXIF orientations, Adobe CMYK from
Pillow), then decodes
each of them and each FILE with `cv2.imread(path, cv2.IMREAD_COLOR)`, as the reference reads images,
writing NAME.bgr: a line "WIDTH HEIGHT" and the BGR bytes. Needs opencv-python-headless, numpy, pillow.
"""

import os
import struct
import sys

import cv2
import numpy as np
from PIL import Image


def pattern(w, h, seed):
    """Smooth gradients, hard edges and noise: every IDCT and upsampling path gets work."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack(
        [
            127 + 120 * np.sin(x / 7.0 + y / 13.0),
            (x * 255.0 / max(w - 1, 1)),
            np.where((x // 8 + y // 8) % 2 == 0, 30.0, 220.0),
        ],
        axis=-1,
    )
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def generated(outdir):
    f = {
        "baseline_420": [cv2.IMWRITE_JPEG_QUALITY, 90],
        "progressive": [cv2.IMWRITE_JPEG_QUALITY, 85, cv2.IMWRITE_JPEG_PROGRESSIVE, 1],
        "optimized": [cv2.IMWRITE_JPEG_QUALITY, 75, cv2.IMWRITE_JPEG_OPTIMIZE, 1],
        "s422": [cv2.IMWRITE_JPEG_QUALITY, 92, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422],
        "s444": [cv2.IMWRITE_JPEG_QUALITY, 92, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444],
        "s440": [cv2.IMWRITE_JPEG_QUALITY, 92, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440],
        "s411": [cv2.IMWRITE_JPEG_QUALITY, 92, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411],
        "restart": [cv2.IMWRITE_JPEG_QUALITY, 80, cv2.IMWRITE_JPEG_RST_INTERVAL, 3],
        "q100_progressive_444": [
            cv2.IMWRITE_JPEG_QUALITY, 100, cv2.IMWRITE_JPEG_PROGRESSIVE, 1,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
        ],
    }
    names = []
    for i, (name, params) in enumerate(f.items()):
        for w, h in [(64, 48), (33, 17)]:
            ok, buf = cv2.imencode(".jpg", pattern(w, h, i), params)
            assert ok, name
            n = f"gen_{name}_{w}x{h}.jpg"
            open(os.path.join(outdir, n), "wb").write(buf.tobytes())
            names.append(n)
    ok, buf = cv2.imencode(".jpg", pattern(45, 31, 99)[:, :, 1], [cv2.IMWRITE_JPEG_QUALITY, 88])
    assert ok
    open(os.path.join(outdir, "gen_grey_45x31.jpg"), "wb").write(buf.tobytes())
    names.append("gen_grey_45x31.jpg")
    # Four-component files as Adobe writes them (inverted CMYK; YCCK is libjpeg's transform of it).
    cmyk = np.concatenate([pattern(40, 24, 7), pattern(40, 24, 8)[:, :, :1]], axis=-1)
    for name, kwargs in [("gen_cmyk_40x24.jpg", {}), ("gen_cmyk_progressive_40x24.jpg", {"progressive": True})]:
        Image.fromarray(cmyk, mode="CMYK").save(os.path.join(outdir, name), quality=90, **kwargs)
        names.append(name)
    # EXIF orientations, which imread applies: a big-endian TIFF block with one Orientation entry.
    base = open(os.path.join(outdir, "gen_baseline_420_33x17.jpg"), "rb").read()
    for o in (3, 6, 8):
        tiff = b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01" + struct.pack(">H", o) + bytes(6)
        app1 = b"Exif\x00\x00" + tiff
        n = f"gen_exif_orientation{o}_33x17.jpg"
        open(os.path.join(outdir, n), "wb").write(base[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + base[2:])
        names.append(n)
    return names


def main():
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    paths = [os.path.join(outdir, n) for n in generated(outdir)] + sys.argv[2:]
    for p in paths:
        img = cv2.imread(p, cv2.IMREAD_COLOR)
        assert img is not None and img.dtype == np.uint8 and img.shape[2] == 3, p
        out = os.path.join(outdir, os.path.basename(p) + ".bgr")
        with open(out, "wb") as f:
            f.write(f"{img.shape[1]} {img.shape[0]}\n".encode())
            f.write(np.ascontiguousarray(img).tobytes())
        print(os.path.basename(p))


if __name__ == "__main__":
    main()
