#!/usr/bin/env python3
"""GPU anchors for tools/gpu-check.sh, measured in the same run on the same GPU and the same weights as
the engine (`retinaface synthetic --seed 1`, which `retinaface bench` also uses): the forward pass alone
(raw loc / softmaxed conf / landmarks, as `retinaface bench --forward-only`), inputs already on the
device, time per batch from CUDA events, median of the timed iterations.

    python3 benches/gpu_baselines.py --bin target/release/retinaface --networks mobilenetv1_0.25,resnet50 \
        --size 640x640 --batches 1,64 [--iters 20] [--budget-s 90] [--dry-run]

Rows (one JSON object per line on stdout, flushed as each is measured, so a run cut short by its
time-box keeps what it finished): PyTorch eager f32 and f16, PyTorch f32 and f16 replayed from a CUDA
graph, ONNX Runtime with the CUDA execution provider (f32) and the TensorRT provider (f32 and f16).
The model is benches/baselines.py's restatement of the reference architecture (BatchNorm unfolded),
checked against the goldens before anything is timed. Needs torch (CUDA), onnx, onnxruntime-gpu and
tensorrt from PyPI (tools/gpu-check.sh installs them into its venv). `--dry-run` checks the imports
and the engine binary only.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def emit(obj):
    print(json.dumps(obj), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the retinaface binary (writes the synthetic weights)")
    ap.add_argument("--networks", default="mobilenetv1_0.25,resnet50")
    ap.add_argument("--size", default="640x640")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=90.0, help="stop starting new measurements after this")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    batches = [int(b) for b in a.batches.split(",")]
    if not os.access(a.bin, os.X_OK):
        sys.exit(f"--bin {a.bin}: not an executable")
    import numpy as np  # noqa: F401
    import torch
    import onnxruntime as ort
    import baselines  # the model, the weights reader, the network table

    for name in a.networks.split(","):
        if name not in baselines.NETS:
            sys.exit(f"--networks: unknown network `{name}`")
    if a.dry_run:
        print(f"gpu_baselines: torch {torch.__version__}, onnxruntime {ort.__version__}: imports ok", file=sys.stderr)
        return 0
    if not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device")
    providers = ort.get_available_providers()
    deadline = time.monotonic() + a.budget_s
    dev = torch.device("cuda")

    def cuda_time(fn, iters):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e))
        return float(np.median(ts)), float(min(ts))

    def row(name, runtime, batch, ms, note=""):
        emit({"network": name, "runtime": runtime, "width": w, "height": h, "batch": batch,
              "ms_per_batch_median": ms[0], "ms_per_batch_min": ms[1], "images_per_s": batch * 1e3 / ms[0], "note": note})

    for name in a.networks.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            wpath = os.path.join(tmp, "w.safetensors")
            subprocess.run([a.bin, "synthetic", "--network", name, "--seed", "1", "--output", wpath], check=True, capture_output=True)
            m = baselines.load_model(name, wpath)
            g = baselines.read_safetensors(os.path.join(baselines.GOLDENS, f"synthetic-{name}-seed1-301x203.safetensors"))
            x = torch.from_numpy(g["input_bgr_u8"].astype(np.float32) - np.array([104, 117, 123], np.float32)).permute(2, 0, 1)[None].contiguous()
            with torch.no_grad():
                loc, conf, _ = m(x)
            err = max(float(np.abs(loc[0].numpy() - g["loc"]).max()), float(np.abs(conf[0].numpy() - g["conf"]).max()))
            if err >= 1e-3:
                sys.exit(f"{name}: the PyTorch model does not compute the reference function (err {err})")
            onnx_path = os.path.join(tmp, "m.onnx")
            torch.onnx.export(m, (torch.zeros(1, 3, h, w),), onnx_path, input_names=["x"], opset_version=17, dynamo=False,
                              dynamic_axes={"x": {0: "n"}})
            # Two copies: converting one module to f16 and back would round the f32 weights.
            models = {False: copy.deepcopy(m).to(dev), True: copy.deepcopy(m).half().to(dev)}
            for b in batches:
                inp = (torch.randn(b, 3, h, w, device=dev) * 50).contiguous()
                for half in (False, True):
                    if time.monotonic() > deadline:
                        emit({"network": name, "batch": b, "runtime": "budget", "note": "time budget spent: remaining anchors skipped"})
                        return 0
                    mm = models[half]
                    xi = inp.half() if half else inp
                    tag = "f16" if half else "f32"
                    with torch.no_grad():
                        row(name, f"pytorch-eager-{tag}", b, cuda_time(lambda: mm(xi), a.iters))
                        # CUDA graph: captured once on a side stream after warm-up, then replayed.
                        s = torch.cuda.Stream()
                        s.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(s):
                            for _ in range(2):
                                mm(xi)
                        torch.cuda.current_stream().wait_stream(s)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            mm(xi)
                        row(name, f"pytorch-cudagraph-{tag}", b, cuda_time(graph.replay, a.iters))
                        del graph
                host = inp.float().cpu().numpy()
                for prov, opts, tag in (
                    ("CUDAExecutionProvider", {}, "ort-cuda-f32"),
                    ("TensorrtExecutionProvider", {"trt_fp16_enable": False}, "ort-tensorrt-f32"),
                    ("TensorrtExecutionProvider", {"trt_fp16_enable": True}, "ort-tensorrt-f16"),
                ):
                    if time.monotonic() > deadline:
                        emit({"network": name, "batch": b, "runtime": "budget", "note": "time budget spent: remaining anchors skipped"})
                        return 0
                    if prov not in providers:
                        emit({"network": name, "batch": b, "runtime": tag, "note": f"{prov} not available ({providers})"})
                        continue
                    sess = ort.InferenceSession(onnx_path, providers=[(prov, opts), "CUDAExecutionProvider"])
                    # Input bound on the device once (io binding), outputs left there: the device's part.
                    io = sess.io_binding()
                    xo = ort.OrtValue.ortvalue_from_numpy(host, "cuda", 0)
                    io.bind_ortvalue_input("x", xo)
                    for o in sess.get_outputs():
                        io.bind_output(o.name, "cuda")
                    t0 = time.monotonic()
                    sess.run_with_iobinding(io)  # engine build (TensorRT) and warm-up
                    build_s = time.monotonic() - t0

                    def run():
                        sess.run_with_iobinding(io)

                    # ORT's run returns after its stream is synchronised: host clock per run.
                    ts = []
                    for _ in range(a.iters):
                        t1 = time.perf_counter()
                        run()
                        ts.append((time.perf_counter() - t1) * 1e3)
                    row(name, tag, b, (float(np.median(ts)), float(min(ts))), f"first run (build) {build_s:.1f} s")
                    del sess
    return 0


if __name__ == "__main__":
    sys.exit(main())
