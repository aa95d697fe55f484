#!/usr/bin/env python3
"""CPU baselines measured in the same run as the engine (forward pass only: raw loc / softmaxed conf /
landmarks, no decoding or NMS; medians and minima over interleaved rounds): PyTorch (eager, the reference architecture
re-stated from docs/retinaface-spec.md, BatchNorm not folded) and ONNX Runtime (the same module
exported to ONNX), against `retinaface bench --backend cpu`. Batch 1, same thread count for all.

    python3 benches/baselines.py --size 640x640 --networks mobilenetv1_0.25,resnet50 [--iters 5] [--rounds 3]
        [--isa avx512,avx2]

`--isa` lists the engine's CPU levels to time (RETINAFACE_CPU_ISA for each engine run; default: the
level the engine picks itself); every level runs in each round, interleaved with PyTorch and ONNX
Runtime, and gets its own row. A level the processor lacks is refused before any timing.

Needs a throwaway venv with torch, onnx and onnxruntime (not part of the engine or its tests).
Weights: the synthetic recipe (`retinaface synthetic`), the same for all three, so all three compute
the same function; each network's PyTorch output is first checked against the reference goldens.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors_np import read_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "retinaface")
GOLDENS = os.path.join(ROOT, "..", "shared", "reference", "goldens")


def cba(cin, cout, k, s, act, groups=1):
    layers = [nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


def leaky(a):
    return nn.LeakyReLU(a) if a > 0 else nn.ReLU()


def make_div(v):
    n = max(8, int((v + 4) // 8 * 8))
    return n + 8 if n < 0.9 * v else n


class MobileNetV1(nn.Module):
    def __init__(self, w):
        super().__init__()
        f = [make_div(c * w) for c in (32, 64, 128, 256, 512, 1024)]
        dw = lambda a, b, s: nn.Sequential(cba(a, a, 3, s, leaky(0.1), groups=a), cba(a, b, 1, 1, leaky(0.1)))
        self.stage1 = nn.Sequential(cba(3, f[0], 3, 2, leaky(0.1)), dw(f[0], f[1], 1), dw(f[1], f[2], 2), dw(f[2], f[2], 1), dw(f[2], f[3], 2), dw(f[3], f[3], 1))
        self.stage2 = nn.Sequential(dw(f[3], f[4], 2), *[dw(f[4], f[4], 1) for _ in range(5)])
        self.stage3 = nn.Sequential(dw(f[4], f[5], 2), dw(f[5], f[5], 1))

    def forward(self, x):
        a = self.stage1(x)
        b = self.stage2(a)
        return [a, b, self.stage3(b)]


class InvRes(nn.Module):
    def __init__(self, cin, cout, s, t):
        super().__init__()
        h = cin * t
        self.res = s == 1 and cin == cout
        layers = [] if t == 1 else [cba(cin, h, 1, 1, nn.ReLU6())]
        layers += [cba(h, h, 3, s, nn.ReLU6(), groups=h), nn.Conv2d(h, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        feats, cin = [cba(3, 32, 3, 2, nn.ReLU6())], 32
        for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
            for i in range(n):
                feats.append(InvRes(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(cba(320, 1280, 1, 1, nn.ReLU6()))
        self.features = nn.Sequential(*feats)

    def forward(self, x):
        outs = []
        for i, m in enumerate(self.features):
            x = m(x)
            if i in (6, 13, 18):
                outs.append(x)
        return outs


class Block(nn.Module):
    def __init__(self, cin, planes, s, bottleneck):
        super().__init__()
        self.bottleneck = bottleneck
        cout = planes * (4 if bottleneck else 1)
        if bottleneck:
            self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, s, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
        else:
            self.conv1, self.bn1 = nn.Conv2d(cin, planes, 3, s, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = nn.Conv2d(planes, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, s, bias=False), nn.BatchNorm2d(cout)) if s != 1 or cin != cout else None

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        if self.bottleneck:
            y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
        else:
            y = self.bn2(self.conv2(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
    def __init__(self, blocks, bottleneck):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        cin = 64
        for li, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512))):
            layer = []
            for i in range(n):
                layer.append(Block(cin, planes, (1 if li == 0 else 2) if i == 0 else 1, bottleneck))
                cin = planes * (4 if bottleneck else 1)
            setattr(self, f"layer{li + 1}", nn.Sequential(*layer))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer1(x)
        a = self.layer2(x)
        b = self.layer3(a)
        return [a, b, self.layer4(b)]


NETS = {
    "mobilenetv1_0.25": (lambda: MobileNetV1(0.25), [64, 128, 256], 64),
    "mobilenetv1_0.50": (lambda: MobileNetV1(0.5), [128, 256, 512], 128),
    "mobilenetv1": (lambda: MobileNetV1(1.0), [256, 512, 1024], 128),
    "mobilenetv2": (MobileNetV2, [32, 96, 1280], 128),
    "resnet18": (lambda: ResNet([2, 2, 2, 2], False), [128, 256, 512], 128),
    "resnet34": (lambda: ResNet([3, 4, 6, 3], False), [128, 256, 512], 128),
    "resnet50": (lambda: ResNet([3, 4, 6, 3], True), [512, 1024, 2048], 256),
}


class SSH(nn.Module):
    def __init__(self, c, a):
        super().__init__()
        self.conv3X3 = cba(c, c // 2, 3, 1, None)
        self.conv5X5_1 = cba(c, c // 4, 3, 1, leaky(a))
        self.conv5X5_2 = cba(c // 4, c // 4, 3, 1, None)
        self.conv7X7_2 = cba(c // 4, c // 4, 3, 1, leaky(a))
        self.conv7x7_3 = cba(c // 4, c // 4, 3, 1, None)

    def forward(self, x):
        t = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(t), self.conv7x7_3(self.conv7X7_2(t))], 1))


class FPN(nn.Module):
    def __init__(self, cins, c, a):
        super().__init__()
        self.output1, self.output2, self.output3 = (cba(ci, c, 1, 1, leaky(a)) for ci in cins)
        self.merge1, self.merge2 = cba(c, c, 3, 1, leaky(a)), cba(c, c, 3, 1, leaky(a))

    def forward(self, xs):
        o1, o2, o3 = self.output1(xs[0]), self.output2(xs[1]), self.output3(xs[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"))
        return [o1, o2, o3]


class Heads(nn.Module):
    def __init__(self, c, d):
        super().__init__()
        setattr(self, "h", nn.ModuleList([nn.Conv2d(c, 2 * d, 1) for _ in range(3)]))


class RetinaFace(nn.Module):
    def __init__(self, name):
        super().__init__()
        make, cins, c = NETS[name]
        a = 0.1 if c <= 64 else 0.0
        self.fx = make()
        self.fpn = FPN(cins, c, a)
        self.ssh1, self.ssh2, self.ssh3 = SSH(c, a), SSH(c, a), SSH(c, a)
        self.class_head = nn.Module()
        self.class_head.class_head = nn.ModuleList([nn.Conv2d(c, 4, 1) for _ in range(3)])
        self.bbox_head = nn.Module()
        self.bbox_head.bbox_head = nn.ModuleList([nn.Conv2d(c, 8, 1) for _ in range(3)])
        self.landmark_head = nn.Module()
        self.landmark_head.landmark_head = nn.ModuleList([nn.Conv2d(c, 20, 1) for _ in range(3)])

    def forward(self, x):
        feats = [s(f) for s, f in zip((self.ssh1, self.ssh2, self.ssh3), self.fpn(self.fx(x)))]
        n = x.shape[0]
        flat = lambda heads, d: torch.cat([h(f).permute(0, 2, 3, 1).reshape(n, -1, d) for h, f in zip(heads, feats)], 1)
        return flat(self.bbox_head.bbox_head, 4), F.softmax(flat(self.class_head.class_head, 2), -1), flat(self.landmark_head.landmark_head, 10)


def load_model(name, weights):
    m = RetinaFace(name).eval()
    sd = {k: torch.from_numpy(v.copy()) for k, v in read_safetensors(weights).items()}
    own = m.state_dict()
    for k in own:
        if k.endswith("num_batches_tracked"):
            sd[k] = own[k]
    m.load_state_dict(sd, strict=True)
    return m


def timed(fn, iters):
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3), float(min(ts) * 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="640x640")
    ap.add_argument("--networks", default=",".join(NETS))
    ap.add_argument("--iters", type=int, default=5, help="timed runs per engine per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--isa", default="", help="comma-separated engine levels (avx512, avx2, portable); empty: the engine's own")
    a = ap.parse_args()
    levels = [v.strip() for v in a.isa.split(",") if v.strip()] or [None]
    for lv in levels:
        if lv not in ("avx512", "avx2", "portable"):
            sys.exit(f"--isa: unknown level `{lv}` (expected avx512, avx2 or portable)")
    w, h = (int(v) for v in a.size.split("x"))
    torch.set_num_threads(a.threads)
    import onnxruntime as ort

    print("| network | engine level | engine ms (median / min) | PyTorch ms | ONNX Runtime ms | speed-up vs PyTorch (median / min) | vs ORT (median / min) |")
    print("|---|---|---|---|---|---|---|")
    for name in a.networks.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            wpath = os.path.join(tmp, "w.safetensors")
            subprocess.run([BIN, "synthetic", "--network", name, "--output", wpath], check=True, capture_output=True)
            m = load_model(name, wpath)
            g = read_safetensors(os.path.join(GOLDENS, f"synthetic-{name}-seed1-301x203.safetensors"))
            x = torch.from_numpy(g["input_bgr_u8"].astype(np.float32) - np.array([104, 117, 123], np.float32)).permute(2, 0, 1)[None].contiguous()
            with torch.no_grad():
                loc, conf, landm = m(x)
            err = max(float(np.abs(loc[0].numpy() - g["loc"]).max()), float(np.abs(conf[0].numpy() - g["conf"]).max()))
            assert err < 1e-3, f"{name}: the PyTorch baseline does not compute the reference function (err {err})"
            inp = torch.randn(1, 3, h, w) * 50
            onnx_path = os.path.join(tmp, "m.onnx")
            torch.onnx.export(m, (inp,), onnx_path, input_names=["x"], opset_version=17, dynamo=False)
            so = ort.SessionOptions()
            so.intra_op_num_threads = a.threads
            sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
            feed = {"x": inp.numpy()}
            # Rounds interleave the three engines, so a slow spell of this shared machine falls on all of
            # them alike; each engine's median and minimum are over all its rounds.
            ours, pts, oxs = {lv: [] for lv in levels}, [], []
            for _ in range(a.rounds):
                for lv in levels:
                    time.sleep(1)  # the other runtimes' idle worker threads stop spinning before ours start
                    env = dict(os.environ)
                    env.pop("RETINAFACE_CPU_AVX512", None)
                    if lv is None:
                        env.pop("RETINAFACE_CPU_ISA", None)
                    else:
                        env["RETINAFACE_CPU_ISA"] = lv
                    out = subprocess.run([BIN, "bench", "--backend", "cpu", "--network", name, "--weights", wpath, "--size", a.size, "--iters", str(a.iters), "--forward-only", "--json"], check=True, capture_output=True, text=True, env=env)
                    # The engine falls back (with a message) when the processor lacks a level: a row
                    # labelled with a level that did not run would be a wrong answer.
                    if lv is not None and "not support" in out.stderr:
                        sys.exit(f"--isa {lv}: {out.stderr.strip()}")
                    lat = json.loads(out.stdout)["latency_ms"]
                    ours[lv].append((lat["p50"], lat["min"]))
                with torch.no_grad():
                    pts.append(timed(lambda: m(inp), a.iters))
                oxs.append(timed(lambda: sess.run(None, feed), a.iters))
            del sess
            med = lambda xs: float(np.median([v[0] for v in xs]))
            low = lambda xs: min(v[1] for v in xs)
            p, x_ = (med(pts), low(pts)), (med(oxs), low(oxs))
            for lv in levels:
                o = (med(ours[lv]), low(ours[lv]))
                print(f"| {name} | {lv or 'auto'} | {o[0]:.1f} / {o[1]:.1f} | {p[0]:.1f} / {p[1]:.1f} | {x_[0]:.1f} / {x_[1]:.1f} | "
                      f"{p[0] / o[0]:.2f}x / {p[1] / o[1]:.2f}x | {x_[0] / o[0]:.2f}x / {x_[1] / o[1]:.2f}x |", flush=True)

if __name__ == "__main__":
    sys.exit(main())
