#!/usr/bin/env python3
"""CPU baselines measured in the same run as the engine (forward pass only: raw loc / softmaxed conf /
landmarks, no decoding or NMS; medians and minima over interleaved rounds): PyTorch (eager, the reference architecture
re-stated from docs/retinaface-spec.md, BatchNorm not folded) and ONNX Runtime (the same module
exported to ONNX), against `retinaface bench --backend cpu`. Batch 1, same thread count for all.

    python3 benches/baselines.py --size 640x640 --networks mobilenetv1_0.25,resnet50 [--iters 5] [--rounds 3]
        [--isa avx512,avx2]

`--isa` lists the engine's CPU levels to time (RETINAFACE_CPU_ISA for each engine run; default: the
level the engine picks itself); every level runs in each round, interleaved with PyTorch and ONNX
Runtime, and gets its own row. A level the processor lacks is refused before any timing. On a processor
with AVX-512 the engine's avx2 runs go under the same CPUID shim as the baselines' (below): the GEMM
crate behind some of its NCHW 1x1 convolutions picks its kernels from CPUID itself, and would otherwise
run AVX-512 in a row labelled avx2.

Each row's baselines run at the engine's level (the `baselines at` column): PyTorch and ONNX Runtime
run in worker processes of this script (`--worker torch|ort --level ...`, one per runtime and level,
each loading its model once and timing a warm-up plus `--iters` passes per round on request). At
avx2 PyTorch gets ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2, and on a processor with
AVX-512 both workers run under tools/cpuid/hide_avx512.c (built with `cc` at start; LD_PRELOAD), which
hides AVX-512 from CPUID, where ONNX Runtime's MLAS looks for it (it has no switch); this needs Linux's
CPUID faulting (`cpuid_fault` in /proc/cpuinfo), and the run stops with the shim's message without it.
At avx512 both run unmasked, PyTorch with ATEN_CPU_CAPABILITY=avx512. Every worker checks that its level
held before it is timed and after every round, and stops the run otherwise: PyTorch's
get_cpu_capability() and oneDNN's ISA and convolution kernels (its verbose output); for ONNX Runtime,
the shim active, CPUID leaf 7 without AVX512F, and the shim's SIGSEGV handler still in place. The
portable level has no counterpart (baselines `auto`, as without `--isa`: the runtimes' own choice).

The last column pairs each round's ONNX Runtime median with the engine's p50 of the same round
(measured seconds apart) and gives the median of those ratios and their range: a slow spell of a
shared machine that lasts longer than a round falls on both sides of its ratio, where the overall
medians may take it on one side only.

Needs a throwaway venv with torch, onnx and onnxruntime (not part of the engine or its tests).
Weights: the synthetic recipe (`retinaface synthetic`), the same for all three, so all three compute
the same function; each network's PyTorch output is first checked against the reference goldens (in
this process and again in each PyTorch worker, at its level), and each ONNX Runtime worker's against
this process's PyTorch output for the timed input.
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


def check_goldens(name, m):
    g = read_safetensors(os.path.join(GOLDENS, f"synthetic-{name}-seed1-301x203.safetensors"))
    x = torch.from_numpy(g["input_bgr_u8"].astype(np.float32) - np.array([104, 117, 123], np.float32)).permute(2, 0, 1)[None].contiguous()
    with torch.no_grad():
        loc, conf, landm = m(x)
    err = max(float(np.abs(loc[0].numpy() - g["loc"]).max()), float(np.abs(conf[0].numpy() - g["conf"]).max()))
    assert err < 1e-3, f"{name}: the PyTorch baseline does not compute the reference function (err {err})"


# The level each engine level's baselines run at: the engine's AVX2 row against ONNX Runtime and
# PyTorch held to AVX2, its AVX-512 row against both at AVX-512. The portable level has no
# counterpart (neither runtime can be held below AVX2 here), so its baselines run at their own
# choice, as without --isa; the table's column says so.
BASELINE_LEVEL = {"avx512": "avx512", "avx2": "avx2", "portable": "auto", None: "auto"}
SHIM_SRC = os.path.join(ROOT, "tools", "cpuid", "hide_avx512.c")


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def worker_env(level, shim):
    """The environment of a baseline worker at `level`. avx2: PyTorch's ATen kernels and oneDNN are
    capped by their own variables; ONNX Runtime has none (MLAS reads CPUID), so on a processor with
    AVX-512 the worker runs under tools/cpuid/hide_avx512.c, which hides AVX-512 from CPUID for the
    whole process (MLAS, oneDNN, PyTorch's cpuinfo and numpy alike). avx512: the runtimes' own choice
    on this processor, stated for PyTorch. auto: the environment as given.

    That MLAS really switches (2026-11-30, Xeon with AVX-512, ONNX Runtime 1.32, ResNet-18 640x640,
    2 threads, `perf record -e cpu-clock`, each sampled address in onnxruntime_pybind11_state.so
    disassembled): without the shim 57% of all samples fall on zmm instructions (vfmadd231ps 41%)
    and none on ymm; under it none on zmm and 69% on ymm (vfmadd231ps 43%). One thread, CPU time per
    inference (minima of 8, two runs): ResNet-18 219-223 ms unmasked, 414-419 ms under the shim;
    MobileNetV1 x0.25 22-24 against 31-33 ms. PyTorch, one thread, avx512 against avx2 as set here:
    ResNet-18 379 against 582 ms, MobileNetV1 x0.25 62 against 73 ms."""
    env = dict(os.environ)
    if level == "auto":
        return env
    for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        env.pop(k, None)
    env["ATEN_CPU_CAPABILITY"] = level
    if level == "avx2":
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
        if shim is not None:
            env["LD_PRELOAD"] = " ".join(v for v in (shim, env.get("LD_PRELOAD", "")) if v)
    return env


def shim_state():
    """The shim's exported state in this process, or None when it is not preloaded."""
    import ctypes

    lib = ctypes.CDLL(None)
    try:
        active = ctypes.c_int.in_dll(lib, "hide_avx512_active").value
    except ValueError:
        return None
    regs = (ctypes.c_uint * 4)()
    lib.hide_avx512_cpuid(7, 0, regs)
    return {
        "active": active,
        "leaf7_ebx": regs[1],
        "trapped": ctypes.c_ulong.in_dll(lib, "hide_avx512_trapped").value,
        "foreign": ctypes.c_int.in_dll(lib, "hide_avx512_foreign").value,
        "handler": lib.hide_avx512_handler_installed(),
    }


def onednn_isa(m, x):
    """oneDNN's ISA line and its convolution implementations, from its verbose output (printed by C
    code on file descriptor 1, so that descriptor is pointed at a file for one forward pass)."""
    import ctypes

    with tempfile.TemporaryFile("w+") as f:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            with torch.no_grad(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                m(x)
        finally:
            ctypes.CDLL(None).fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        lines = f.read().splitlines()
    isa = next((ln.split("isa:", 1)[1] for ln in lines if ",isa:" in ln), "")
    convs = sorted({ln.split(",")[6] for ln in lines if ",primitive,exec,cpu,convolution," in ln})
    return isa, convs


def check_level(kind, level, shim_expected, state, report):
    """Fails the worker unless it really runs at `level`: a row labelled AVX2 whose baseline ran
    AVX-512 would be a wrong answer. `report`: PyTorch's reported levels, None before they are known."""
    if level == "auto":
        return
    if level == "avx2":
        if shim_expected:
            if state is None or not state["active"]:
                sys.exit(f"{kind} worker at avx2: hide_avx512.so is not active in this process")
            if state["leaf7_ebx"] & (1 << 16):
                sys.exit(f"{kind} worker at avx2: CPUID still reports AVX-512F under the shim")
            if not state["handler"]:
                sys.exit(f"{kind} worker at avx2: the shim's SIGSEGV handler was replaced (CPUID is no longer masked)")
        elif "avx512f" in cpu_flags():
            sys.exit(f"{kind} worker at avx2: the processor has AVX-512 and the shim is not loaded")
    if level == "avx512":
        if state is not None:
            sys.exit(f"{kind} worker at avx512: hide_avx512.so is preloaded")
        if "avx512f" not in cpu_flags():
            sys.exit(f"{kind} worker at avx512: the processor has no AVX-512")
    if kind == "torch" and report is not None:
        want = {"avx2": "AVX2", "avx512": "AVX512"}[level]
        if report["capability"] != want:
            sys.exit(f"torch worker at {level}: torch.backends.cpu.get_cpu_capability() is {report['capability']}, not {want}")
        isa, convs = report["onednn_isa"], report["onednn_convs"]
        wide = any("512" in c or "avx10" in c for c in convs) or "512" in isa or "AVX 10" in isa
        if (level == "avx2") == wide or not convs:
            sys.exit(f"torch worker at {level}: oneDNN runs {isa or 'an unknown ISA'} with convolutions {convs}")


def worker(a):
    """One runtime (PyTorch or ONNX Runtime) at one level, in its own process so the level holds for
    everything it loads: prints a JSON line when ready, then for every `run` line on stdin a warm-up
    and `--iters` timed forward passes as a JSON line, until stdin closes."""
    state = shim_state()
    check_level(a.worker, a.level, a.shim_expected, state, None)  # before minutes of loading
    report = {"kind": a.worker, "level": a.level}
    inp = np.load(a.input)
    torch.set_num_threads(a.threads)
    if a.worker == "torch":
        m = load_model(a.network, a.weights)
        report["capability"] = torch.backends.cpu.get_cpu_capability()
        report["onednn_isa"], report["onednn_convs"] = onednn_isa(m, torch.from_numpy(inp))
        # The reference check at the level being timed: held to AVX2, PyTorch still computes the
        # engine's function.
        check_goldens(a.network, m)
        x = torch.from_numpy(inp)

        def fn():
            with torch.no_grad():
                return m(x)

    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        sess = ort.InferenceSession(a.onnx, so, providers=["CPUExecutionProvider"])
        feed = {"x": inp}
        # The parent's PyTorch outputs for the same input: ONNX Runtime under the shim computes the
        # same function (float32 rounding and summation order apart).
        ref = np.load(a.reference)
        out = sess.run(None, feed)
        for k, o in zip(("loc", "conf"), out):
            err = float(np.abs(o - ref[k]).max())
            scale = max(1.0, float(np.abs(ref[k]).max()))
            if err > 1e-3 * scale:
                sys.exit(f"ort worker at {a.level}: {k} differs from PyTorch by {err} (scale {scale})")

        def fn():
            return sess.run(None, feed)

    state = shim_state()  # after the runtime loaded and ran: its CPUID reads and handlers counted
    if state is not None:
        report["shim"] = state
    check_level(a.worker, a.level, a.shim_expected, state, report)
    print(json.dumps({"ready": report}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            sys.exit(f"{a.worker} worker: unknown command {line.strip()!r}")
        med, low = timed(fn, a.iters)
        state = shim_state()
        check_level(a.worker, a.level, a.shim_expected, state, report)
        print(json.dumps({"median": med, "min": low, "shim": state}), flush=True)


class Worker:
    """The parent's side of one worker process."""

    def __init__(self, kind, level, shim, args, tmp):
        self.kind, self.level = kind, level
        self.err = tempfile.TemporaryFile("w+", dir=tmp)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--level", level, "--network", args["network"],
               "--weights", args["weights"], "--onnx", args["onnx"], "--input", args["input"], "--reference", args["reference"],
               "--iters", str(args["iters"]), "--threads", str(args["threads"])]
        if shim is not None and level == "avx2":
            cmd.append("--shim-expected")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                  env=worker_env(level, shim))
        self.ready = self.read()["ready"]

    def read(self):
        line = self.p.stdout.readline()
        if not line:
            self.p.wait()
            self.err.seek(0)
            sys.exit(f"the {self.kind} worker at {self.level} stopped (status {self.p.returncode}):\n{self.err.read().strip()}")
        return json.loads(line)

    def run(self):
        self.p.stdin.write("run\n")
        self.p.stdin.flush()
        r = self.read()
        return r["median"], r["min"]

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def build_shim(tmp):
    so = os.path.join(tmp, "hide_avx512.so")
    cc = os.environ.get("CC", "cc")
    r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", so, SHIM_SRC, "-ldl"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"building {SHIM_SRC} with {cc} failed (needed to hold ONNX Runtime to AVX2):\n{r.stderr}")
    return so


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="640x640")
    ap.add_argument("--networks", default=",".join(NETS))
    ap.add_argument("--iters", type=int, default=5, help="timed runs per engine per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--isa", default="", help="comma-separated engine levels (avx512, avx2, portable); empty: the engine's own")
    # Worker mode (started by the parent, one process per runtime and level).
    ap.add_argument("--worker", choices=("torch", "ort"), help=argparse.SUPPRESS)
    ap.add_argument("--level", help=argparse.SUPPRESS)
    ap.add_argument("--network", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    ap.add_argument("--shim-expected", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    levels = [v.strip() for v in a.isa.split(",") if v.strip()] or [None]
    for lv in levels:
        if lv is not None and lv not in ("avx512", "avx2", "portable"):
            sys.exit(f"--isa: unknown level `{lv}` (expected avx512, avx2 or portable)")
    w, h = (int(v) for v in a.size.split("x"))
    torch.set_num_threads(a.threads)
    blevels = list(dict.fromkeys(BASELINE_LEVEL[lv] for lv in levels))
    top = tempfile.TemporaryDirectory()
    # The shim is needed only where there is AVX-512 to hide; without it the processor itself holds
    # the runtimes to AVX2 (the workers check which).
    shim = build_shim(top.name) if "avx2" in blevels and "avx512f" in cpu_flags() else None

    print("| network | engine level | baselines at | engine ms (median / min) | PyTorch ms | ONNX Runtime ms | speed-up vs PyTorch (median / min) | vs ORT (median / min) | vs ORT by round (median, range) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.networks.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            wpath = os.path.join(tmp, "w.safetensors")
            subprocess.run([BIN, "synthetic", "--network", name, "--output", wpath], check=True, capture_output=True)
            m = load_model(name, wpath)
            check_goldens(name, m)
            inp = torch.randn(1, 3, h, w) * 50
            onnx_path = os.path.join(tmp, "m.onnx")
            torch.onnx.export(m, (inp,), onnx_path, input_names=["x"], opset_version=17, dynamo=False)
            with torch.no_grad():
                loc, conf, _ = m(inp)
            files = {"network": name, "weights": wpath, "onnx": onnx_path, "input": os.path.join(tmp, "x.npy"),
                     "reference": os.path.join(tmp, "ref.npz"), "iters": a.iters, "threads": a.threads}
            np.save(files["input"], inp.numpy())
            np.savez(files["reference"], loc=loc.numpy(), conf=conf.numpy())
            del m
            workers = {(k, bl): Worker(k, bl, shim, files, tmp) for bl in blevels for k in ("torch", "ort")}
            for (k, bl), wk in workers.items():
                r = wk.ready
                held = (f"capability {r['capability']}, oneDNN {r['onednn_isa']} {' '.join(r['onednn_convs'])}" if k == "torch"
                        else "" if "shim" in r else "CPUID unmasked")
                if "shim" in r:
                    st = r["shim"]
                    held += (f"{'; ' if held else ''}hide_avx512.so: CPUID leaf 7 EBX {st['leaf7_ebx']:#010x}, {st['trapped']} CPUID instructions trapped, "
                             f"{st['foreign']} SIGSEGV handlers installed by libraries")
                print(f"{name}: {'PyTorch' if k == 'torch' else 'ONNX Runtime'} at {bl}: {held}", file=sys.stderr, flush=True)
            # Rounds interleave the engine levels and the workers, so a slow spell of this shared
            # machine falls on all of them alike; each one's median and minimum are over all its rounds.
            ours = {lv: [] for lv in levels}
            base = {key: [] for key in workers}
            for _ in range(a.rounds):
                for lv in levels:
                    time.sleep(1)  # the other runtimes' idle worker threads stop spinning before ours start
                    env = dict(os.environ)
                    # The same thread count as the baselines (rayon's pool otherwise takes every core).
                    env["RAYON_NUM_THREADS"] = str(a.threads)
                    env.pop("RETINAFACE_CPU_AVX512", None)
                    if lv is None:
                        env.pop("RETINAFACE_CPU_ISA", None)
                    else:
                        env["RETINAFACE_CPU_ISA"] = lv
                    if lv == "avx2" and shim is not None:
                        env["LD_PRELOAD"] = " ".join(v for v in (shim, env.get("LD_PRELOAD", "")) if v)
                    out = subprocess.run([BIN, "bench", "--backend", "cpu", "--network", name, "--weights", wpath, "--size", a.size, "--iters", str(a.iters), "--forward-only", "--json"], check=True, capture_output=True, text=True, env=env)
                    # The engine falls back (with a message) when the processor lacks a level: a row
                    # labelled with a level that did not run would be a wrong answer.
                    if lv is not None and "not support" in out.stderr:
                        sys.exit(f"--isa {lv}: {out.stderr.strip()}")
                    lat = json.loads(out.stdout)["latency_ms"]
                    ours[lv].append((lat["p50"], lat["min"]))
                for key, wk in workers.items():
                    time.sleep(1)  # likewise between the workers
                    base[key].append(wk.run())
            for wk in workers.values():
                wk.close()
            med = lambda xs: float(np.median([v[0] for v in xs]))
            # Each round's own ratio (ORT's median over the engine's p50 of that round, measured seconds
            # apart): a slow spell of the machine lasting longer than a round falls on both sides of it.
            by_round = lambda xs, ys: sorted(y[0] / x[0] for x, y in zip(xs, ys))
            low = lambda xs: min(v[1] for v in xs)
            for lv in levels:
                bl = BASELINE_LEVEL[lv]
                o = (med(ours[lv]), low(ours[lv]))
                p = (med(base[("torch", bl)]), low(base[("torch", bl)]))
                x_ = (med(base[("ort", bl)]), low(base[("ort", bl)]))
                r = by_round(ours[lv], base[("ort", bl)])
                print(f"| {name} | {lv or 'auto'} | {bl} | {o[0]:.1f} / {o[1]:.1f} | {p[0]:.1f} / {p[1]:.1f} | {x_[0]:.1f} / {x_[1]:.1f} | "
                      f"{p[0] / o[0]:.2f}x / {p[1] / o[1]:.2f}x | {x_[0] / o[0]:.2f}x / {x_[1] / o[1]:.2f}x | "
                      f"{float(np.median(r)):.2f}x, {r[0]:.2f}–{r[-1]:.2f} |", flush=True)
    top.cleanup()


if __name__ == "__main__":
    sys.exit(main())
