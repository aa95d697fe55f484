#!/usr/bin/env python3
"""Writes tests/fixtures/opencv_resize.json: random BGR images and OpenCV's INTER_LINEAR resize of them.
Run in a throwaway venv with opencv-python and numpy; the engine and its tests do not need them."""
import json, numpy as np, cv2
rng = np.random.default_rng(7)
cases = []
for (w, h, r) in [(37, 23, 1600/624), (64, 48, 2150/1024), (101, 67, 0.5), (50, 31, 1.7), (40, 40, 0.37), (33, 21, 2.0), (29, 17, 3.0), (90, 70, 0.8123)]:
    src = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    # smooth a bit so both paths see realistic gradients as well as noise
    dst = cv2.resize(src, None, None, fx=r, fy=r, interpolation=cv2.INTER_LINEAR)
    cases.append({"width": w, "height": h, "factor": r, "src": src.flatten().tolist(), "dst_width": dst.shape[1], "dst_height": dst.shape[0], "dst": dst.flatten().tolist()})
json.dump({"generator": "cv2.resize(src, None, None, fx=r, fy=r, interpolation=cv2.INTER_LINEAR), OpenCV " + cv2.__version__, "cases": cases}, open(__import__("os").path.join(__import__("os").path.dirname(__file__), "..", "tests", "fixtures", "opencv_resize.json"), "w"))
print([ (c["dst_width"], c["dst_height"]) for c in cases])
