#!/usr/bin/env python3
"""Convert a RetinaFace PyTorch checkpoint to the engine's safetensors.

    python3 tools/convert_weights.py IN.pth OUT.safetensors [--network NAME]

Reads both checkpoint layouts (the reference's, and the older Pytorch_Retinaface one with an optional
`module.` prefix) in both torch.save formats (zip since torch 1.6, and the legacy pickle stream), maps
keys to the reference layout, and writes f32 tensors with the network name in the metadata.

No pickle code is executed: a restricted unpickler resolves only the globals a state dict uses, and
refuses every other. Needs only the Python standard library (no torch, no numpy, no GPU).
"""

import argparse
import io
import json
import pickle
import struct
import sys
import zipfile
from array import array

ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
}
# storage class -> (struct code, element size)
STORAGES = {
    "FloatStorage": ("f", 4),
    "DoubleStorage": ("d", 8),
    "HalfStorage": ("e", 2),
    "LongStorage": ("q", 8),
    "IntStorage": ("i", 4),
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class ConvertError(Exception):
    pass


class StorageType:
    def __init__(self, name):
        self.name = name


class Storage:
    def __init__(self, stype, key):
        self.stype, self.key = stype, key


class TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, offset, size, stride, *_):
    return TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, *_):
    return data


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch" and name in STORAGES:
            return StorageType(name)
        if (module, name) not in ALLOWED:
            raise ConvertError(f"refusing to load global {module}.{name}: not part of a plain state dict")
        if name == "OrderedDict":
            import collections

            return collections.OrderedDict
        return {"_rebuild_tensor_v2": _rebuild_tensor_v2, "_rebuild_parameter": _rebuild_parameter}[name]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise ConvertError(f"unsupported persistent id {pid!r}")
        stype = pid[1]
        if not isinstance(stype, StorageType):
            raise ConvertError(f"unsupported storage type {stype!r}")
        return Storage(stype.name, str(pid[2]))


def find_state_dict(obj):
    if isinstance(obj, dict):
        if any(isinstance(v, TensorRef) for v in obj.values()):
            return obj
        for k in ("state_dict", "model", "net"):
            if isinstance(obj.get(k), dict):
                return find_state_dict(obj[k])
    raise ConvertError("the checkpoint holds no dict of tensors")


def read_zip(path):
    zf = zipfile.ZipFile(path)
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
    if not pkl:
        raise ConvertError("no data.pkl in the archive")
    prefix = pkl[0][: -len("data.pkl")]
    if prefix + "byteorder" in names and zf.read(prefix + "byteorder") != b"little":
        raise ConvertError("big-endian checkpoints are not supported")
    sd = find_state_dict(RestrictedUnpickler(io.BytesIO(zf.read(pkl[0]))).load())
    return sd, lambda key: zf.read(f"{prefix}data/{key}")


def read_legacy(data):
    f = io.BytesIO(data)
    if RestrictedUnpickler(f).load() != LEGACY_MAGIC:
        raise ConvertError("neither a zip checkpoint nor a legacy torch.save file (bad magic number)")
    if RestrictedUnpickler(f).load() != 1001:
        raise ConvertError("unsupported legacy protocol version")
    RestrictedUnpickler(f).load()  # system info
    sd = find_state_dict(RestrictedUnpickler(f).load())
    keys = RestrictedUnpickler(f).load()
    sizes = {t.storage.key: STORAGES[t.storage.stype][1] for t in sd.values() if isinstance(t, TensorRef)}
    blobs = {}
    for key in keys:
        head = f.read(8)
        if len(head) != 8:
            raise ConvertError(f"storage {key}: file ends before its size")
        (count,) = struct.unpack("<q", head)
        nbytes = count * sizes.get(key, 4)
        blob = f.read(nbytes)
        if len(blob) != nbytes:
            raise ConvertError(f"storage {key}: file ends inside its {count} elements (truncated?)")
        blobs[key] = blob
    return sd, lambda key: blobs[key]


def materialise(name, t, storage_bytes, cache):
    code, size = STORAGES[t.storage.stype]
    if t.storage.key not in cache:
        raw = storage_bytes(t.storage.key)
        vals = struct.unpack(f"<{len(raw) // size}{code}", raw)
        cache[t.storage.key] = vals
    vals = cache[t.storage.key]
    n = 1
    for s in t.size:
        n *= s
    out = array("f")
    if n == 0:
        return out
    # contiguous fast path
    contiguous, expect = True, 1
    for s, st in zip(reversed(t.size), reversed(t.stride)):
        if s != 1 and st != expect:
            contiguous = False
        expect *= s
    if contiguous:
        if t.offset + n > len(vals):
            raise ConvertError(f"tensor {name} reaches past its storage")
        out.extend(float(v) for v in vals[t.offset : t.offset + n])
        return out
    idx = [0] * len(t.size)
    for _ in range(n):
        out.append(float(vals[t.offset + sum(i * s for i, s in zip(idx, t.stride))]))
        for d in reversed(range(len(idx))):
            idx[d] += 1
            if idx[d] < t.size[d]:
                break
            idx[d] = 0
    return out


def reference_key(key):
    """Older Pytorch_Retinaface key -> reference key (reference keys pass through)."""
    if key.startswith("module."):
        key = key[len("module.") :]
    for old, new in (("ClassHead.", "class_head.class_head."), ("BboxHead.", "bbox_head.bbox_head."), ("LandmarkHead.", "landmark_head.landmark_head.")):
        if key.startswith(old):
            return new + key[len(old) :].replace(".conv1x1", "", 1)
    if not key.startswith("body."):
        return key
    parts = key[len("body.") :].split(".")
    if len(parts) >= 4 and parts[0].startswith("stage") and parts[1].isdigit() and parts[2].isdigit():
        i, c = int(parts[1]), int(parts[2])
        if not (parts[0] == "stage1" and i == 0) and c < 6:
            return "fx.%s.%d.%d.%d.%s" % (parts[0], i, c // 3, c % 3, ".".join(parts[3:]))
    return "fx." + ".".join(parts)


def infer_network(tensors):
    if "fx.layer1.0.conv3.weight" in tensors:
        return "resnet50"
    if "fx.layer3.5.conv1.weight" in tensors:
        return "resnet34"
    if "fx.layer1.0.conv1.weight" in tensors:
        return "resnet18"
    if "fx.features.0.0.weight" in tensors:
        return "mobilenetv2"
    stem = tensors.get("fx.stage1.0.0.weight")
    if stem is not None:
        width = {8: "mobilenetv1_0.25", 16: "mobilenetv1_0.50", 32: "mobilenetv1"}.get(stem[0][0])
        if width:
            return width
    raise ConvertError("cannot tell the network from the tensors; pass --network")


def write_safetensors(path, tensors, network):
    header, offset, blobs = {"__metadata__": {"network": network}}, 0, []
    for name in sorted(tensors):
        shape, data = tensors[name]
        if sys.byteorder != "little":
            data = array("f", data)
            data.byteswap()
        raw = data.tobytes()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)


def convert(src, dst, network=None):
    with open(src, "rb") as f:
        data = f.read()
    try:
        sd, storage_bytes = read_zip(src) if data[:4] == b"PK\x03\x04" else read_legacy(data)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, KeyError, ValueError) as e:
        raise ConvertError(f"unreadable checkpoint: {e}") from e
    cache, tensors = {}, {}
    for name, t in sd.items():
        if not isinstance(t, TensorRef):
            continue
        tensors[reference_key(name)] = (t.size, materialise(name, t, storage_bytes, cache))
    net = network or infer_network(tensors)
    write_safetensors(dst, tensors, net)
    return net, len(tensors)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--network", help="network name to record (inferred from the tensors when omitted)")
    a = ap.parse_args()
    try:
        net, n = convert(a.input, a.output, a.network)
    except (ConvertError, OSError) as e:
        print(f"error: {a.input}: {e}", file=sys.stderr)
        return 1
    print(f"{a.input} -> {a.output}: {n} tensors, network {net}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
