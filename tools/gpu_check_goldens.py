#!/usr/bin/env python3
"""Every golden case through `retinaface forward` on a backend and precision, against the reference's
raw outputs (../shared/reference/goldens): one JSON line per case, exit 1 if any exceeds its bound.

    python3 tools/gpu_check_goldens.py --bin target/release/retinaface --backend cuda --precision f32

Bounds: f32, the CPU path's 5e-5 normalised max error (max |a - b| / max(1, max |b|)) on loc, conf and
landmarks (tests/gpu.rs checks the same plus the detections); f16, the tensor-core issue's score bound
(softmaxed conf within 0.05; its box IoU and landmark bounds are the detection-level tests' business,
tests/f16_*), with loc and landmark errors reported. Needs numpy.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benches"))
SHARED = os.path.join(HERE, "..", "..", "shared")

from safetensors_np import read_safetensors  # noqa: E402 (benches/ is on the path above)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--precision", default="f32", choices=["f32", "f16"])
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    a = ap.parse_args()
    import numpy as np

    gdir = os.path.join(SHARED, "reference", "goldens")
    index = json.load(open(os.path.join(gdir, "index.json")))
    wanted = [c for c in a.cases.split(",") if c]
    failed = 0
    for c in index:
        if wanted and c["name"] not in wanted:
            continue
        cmd = [a.bin, "forward", "--backend", a.backend, "--network", c["network"]]
        if a.precision != "f32":
            cmd += ["--precision", a.precision]
        if "synthetic_seed" in c:
            cmd += ["--synthetic-seed", str(c["synthetic_seed"])]
        else:
            cmd += ["--weights", os.path.join(SHARED, c["checkpoint"])]
        golden = os.path.join(gdir, c["name"] + ".safetensors")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.safetensors")
            p = subprocess.run(cmd + ["--input", golden, "--output", out], capture_output=True, text=True)
            if p.returncode != 0:
                print(json.dumps({"case": c["name"], "precision": a.precision, "pass": False, "error": p.stderr.strip()[-400:]}), flush=True)
                failed += 1
                continue
            got, want = read_safetensors(out), read_safetensors(golden)
        err = {}
        for k in ("loc", "conf", "landmarks"):
            g, w = got[k].astype(np.float64), want[k].astype(np.float64)
            err[k] = float(np.abs(g - w).max() / max(1.0, float(np.abs(w).max())))
        ok = all(v <= 5e-5 for v in err.values()) if a.precision == "f32" else err["conf"] <= 0.05
        failed += not ok
        print(json.dumps({"case": c["name"], "precision": a.precision, "pass": ok, "max_err": err}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
