#!/usr/bin/env python3
"""Writes the seed corpora of tests/fuzz.rs into fuzz/corpus/ (committed; run once, kept small).

    python tools/make_fuzz_corpus.py OPENCV_JPEG_DIR

image/: the small JPEGs tools/opencv_jpeg.py generates (every coding mode) and PNGs of every colour type.
pth/: tiny state dicts in both torch.save formats, pickled as torch pickles them (persistent storage ids,
_rebuild_tensor_v2, OrderedDict), without torch. safetensors/: tiny files. mat/: MAT v5 files with a
double matrix, a cell of strings, compressed and not. Needs only the standard library, plus Pillow for PNGs.
"""

import collections
import io
import os
import pickle
import shutil
import struct
import sys
import types
import zipfile
import zlib

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fuzz", "corpus")


def fake_torch():
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    class LongStorage:
        pass

    for c in (FloatStorage, LongStorage):
        c.__module__ = "torch"
        c.__qualname__ = c.__name__
        setattr(torch, c.__name__, c)

    def _rebuild_tensor_v2(*a):
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    sys.modules["torch"] = torch
    sys.modules["torch._utils"] = utils
    return torch, _rebuild_tensor_v2


TORCH, REBUILD = fake_torch()


class StorageRef:
    def __init__(self, key, dtype, n):
        self.key, self.dtype, self.n = key, dtype, n


class TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (REBUILD, self.args)


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return ("storage", getattr(TORCH, obj.dtype), obj.key, "cpu", obj.n)
        return None


def state_dict():
    """Two float tensors sharing one storage (a view at an offset), and an int64 step counter."""
    s0 = StorageRef("0", "FloatStorage", 12)
    s1 = StorageRef("1", "LongStorage", 1)
    sd = collections.OrderedDict()
    sd["fx.stage1.0.0.weight"] = TensorRef(s0, 0, (2, 1, 2, 2), (4, 4, 2, 1))
    sd["fx.stage1.0.1.weight"] = TensorRef(s0, 8, (4,), (1,))
    sd["fx.stage1.0.1.num_batches_tracked"] = TensorRef(s1, 0, (), ())
    data = {"0": struct.pack("<12f", *[0.5 * i - 2 for i in range(12)]), "1": struct.pack("<q", 7)}
    return sd, data


def dump(obj, protocol=2):
    buf = io.BytesIO()
    TorchPickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def write(sub, name, data):
    os.makedirs(os.path.join(OUT, sub), exist_ok=True)
    with open(os.path.join(OUT, sub, name), "wb") as f:
        f.write(data)


def pth():
    sd, data = state_dict()
    for name, wrap in [("zip.pth", sd), ("zip_nested.pth", {"state_dict": sd, "epoch": 3})]:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", dump(wrap))
            z.writestr("archive/byteorder", "little")
            for k, v in data.items():
                z.writestr(f"archive/data/{k}", v)
            z.writestr("archive/version", "3\n")
        write("pth", name, buf.getvalue())
    legacy = dump(0x1950A86A20F9469CFC6C) + dump(1001) + dump({"protocol_version": 1001, "little_endian": True})
    legacy += dump(sd) + dump(list(data.keys()))
    legacy += struct.pack("<q", 12) + data["0"] + struct.pack("<q", 1) + data["1"]
    write("pth", "legacy.pth", legacy)


def safetensors():
    def st(tensors, meta=None):
        header, blob = {}, b""
        if meta:
            header["__metadata__"] = meta
        for name, (dtype, shape, data) in tensors.items():
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(data)]}
            blob += data
        h = __import__("json").dumps(header).encode()
        return struct.pack("<Q", len(h)) + h + blob

    w = struct.pack("<8f", *range(8))
    write("safetensors", "f32.safetensors", st({"fx.stage1.0.0.weight": ("F32", [2, 1, 2, 2], w)}, {"network": "mobilenetv1_0.25"}))
    write("safetensors", "mixed.safetensors", st({
        "a.weight": ("F16", [2], struct.pack("<2e", 1.5, -2.0)),
        "b.weight": ("BF16", [1], b"\x80\x3f"),
        "c.weight": ("F64", [1], struct.pack("<d", 3.25)),
        "fx.stage1.0.1.num_batches_tracked": ("I64", [], struct.pack("<q", 7)),
    }))


def mat():
    def element(t, data):
        pad = 0 if t == 15 else (8 - len(data) % 8) % 8  # compressed elements are not padded
        return struct.pack("<II", t, len(data)) + data + b"\0" * pad

    def matrix(name, cls, dims, body):
        flags = element(6, struct.pack("<II", cls, 0))
        d = element(5, struct.pack(f"<{len(dims)}i", *dims))
        n = element(1, name.encode())
        return element(14, flags + d + n + body)

    doubles = matrix("scores", 6, [2, 3], element(9, struct.pack("<6d", *[0.1 * i for i in range(6)])))
    chars = matrix("", 4, [1, 5], element(4, "event".encode("utf-16-le")))
    cell = matrix("event_list", 1, [1, 1], chars)
    header = b"MATLAB 5.0 MAT-file, written by make_fuzz_corpus.py".ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    write("mat", "plain.mat", header + doubles + cell)
    write("mat", "compressed.mat", header + element(15, zlib.compress(doubles)) + element(15, zlib.compress(cell)))


def images(jpeg_dir):
    keep = ["gen_baseline_420_33x17.jpg", "gen_progressive_33x17.jpg", "gen_s422_33x17.jpg", "gen_s444_33x17.jpg",
            "gen_restart_33x17.jpg", "gen_grey_45x31.jpg", "gen_cmyk_40x24.jpg", "gen_exif_orientation6_33x17.jpg",
            "gen_optimized_33x17.jpg"]
    os.makedirs(os.path.join(OUT, "image"), exist_ok=True)
    for k in keep:
        shutil.copy(os.path.join(jpeg_dir, k), os.path.join(OUT, "image", k))
    from PIL import Image

    for mode, name in [("L", "grey"), ("RGB", "rgb"), ("RGBA", "rgba"), ("P", "palette"), ("I;16", "grey16")]:
        img = Image.new(mode, (13, 7))
        img.putdata([(i * 37) % (256 if mode != "I;16" else 65536) for i in range(13 * 7)] if mode in ("L", "P", "I;16")
                    else [tuple((i * k) % 256 for k in range(3, 3 + len(mode))) for i in range(13 * 7)])
        buf = io.BytesIO()
        img.save(buf, "PNG", interlace=(name == "rgb"))
        write("image", f"{name}.png", buf.getvalue())


if __name__ == "__main__":
    pth()
    safetensors()
    mat()
    images(sys.argv[1])
