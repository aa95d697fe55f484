"""A safetensors file as NumPy arrays (F32 and U8 tensors, as the goldens and the engine's weights
hold), with the standard library and NumPy only: for the benchmark and check scripts."""

import json
import struct

import numpy as np


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for k, v in header.items():
            if k == "__metadata__":
                continue
            a, b = v["data_offsets"]
            f.seek(base + a)
            dt = {"F32": np.float32, "U8": np.uint8}[v["dtype"]]
            out[k] = np.frombuffer(f.read(b - a), dtype=dt).reshape(v["shape"])
        return out
