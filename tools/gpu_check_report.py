#!/usr/bin/env python3
"""The report of tools/gpu-check.sh: reads a run's directory (steps.jsonl and each step's output) and
writes OUT_DIR/gpu-check.md (one markdown table) and OUT_DIR/gpu-check.json (the same rows).

    python3 tools/gpu_check_report.py OUT_DIR [--commit REV] [--driver TEXT] [--dry-run]
    tools/gpu-check.sh --report-from OUT_DIR      # the same, for a run already made

gpu-check.sh passes the commit, the driver line and the dry-run flag; they are kept in OUT_DIR/run.json,
so a report rebuilt later from the same directory (no flags) says the same.

An engine row (one line of `retinaface bench --json`) shows the end-to-end time on the host clock and
the GPU time from CUDA events in separate columns, then one column per stage of bench's `stages_ms`,
taken by name, and where those came from (`stages_source`). A row whose stages are not device event
times shows "n/a: <its stages_source>" (or "n/a: not reported" when bench wrote none) instead.

Python's standard library only (CI runs this). A step output that cannot be read (a line that is not
JSON, a row without a field the table needs, a missing file of a step that passed) is an error naming
the file and line: every error is printed, the report is still written with them listed (a GPU run
keeps what it measured), and the exit status is 1.
"""

import argparse
import json
import math
import os
import sys

# The order stage columns are shown in when bench reports these names (pipeline order); any other name
# bench reports is shown after them, in the order first seen. Bench's JSON keys come sorted by name.
STAGE_ORDER = ["upload", "preprocess", "backbone", "fpn_ssh", "neck", "heads", "postprocess", "readback"]
# What a stage holds on the CUDA executor (src/cuda/stages.rs), said under the table for names present.
STAGE_MEANING = {
    "preprocess": "the input's upload and the preprocess kernel",
    "backbone": "the backbone's ops",
    "fpn_ssh": "FPN + SSH",
    "heads": "the heads when run apart (forward-only; with detection they are fused into post-processing)",
    "postprocess": "from the end of the forward pass to the detections on the host (readback included)",
}


class Report:
    def __init__(self, out):
        self.out = out
        self.errors = []

    def error(self, msg):
        self.errors.append(msg)

    def path(self, name):
        return os.path.join(self.out, name)

    def jsonl(self, name, required):
        """The JSON objects of file `name`, each with its line number. A missing file is an error when
        `required` (the step that writes it passed); a line that is not a JSON object is an error."""
        p = self.path(name)
        if not os.path.exists(p):
            if required:
                self.error(f"{p}: missing (its step passed, so it should hold its results)")
            return []
        rows = []
        with open(p, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    self.error(f"{p} line {n}: not JSON ({e}): {line[:120]!r}")
                    continue
                if not isinstance(obj, dict):
                    self.error(f"{p} line {n}: a JSON {type(obj).__name__}, not an object: {line[:120]!r}")
                    continue
                rows.append((n, obj))
        return rows

    def field(self, obj, where, *keys, kind=(int, float), null=False):
        """obj[keys[0]][keys[1]]..., checked to be of `kind` (None allowed when `null`); an error naming
        `where` and the field when it is absent or of another type."""
        v = obj
        for k in keys:
            if not isinstance(v, dict) or k not in v:
                self.error(f"{where}: no field {'.'.join(keys)}")
                return False, None
            v = v[k]
        if v is None and null:
            return True, None
        bad_number = kind == (int, float) and (isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)))
        if not isinstance(v, kind) or bad_number:
            self.error(f"{where}: field {'.'.join(keys)} is {json.dumps(v)}, not a {describe(kind)}")
            return False, None
        return True, v


def describe(kind):
    return {str: "string", int: "integer", dict: "JSON object"}.get(kind, "number")


def engine_rows(rep, name, required):
    """The rows of one sweep step's file: one per bench line, and one for its streamed throughput."""
    rows = []
    for n, r in rep.jsonl(name + ".jsonl", required):
        where = f"{rep.path(name + '.jsonl')} line {n}"
        checks = [
            rep.field(r, where, "network", kind=str),
            rep.field(r, where, "width", kind=int),
            rep.field(r, where, "height", kind=int),
            rep.field(r, where, "batch", kind=int),
            rep.field(r, where, "images_per_s"),
            rep.field(r, where, "latency_ms", "p50"),
            rep.field(r, where, "device_ms_per_batch", null=True) if "device_ms_per_batch" in r else (True, None),
            rep.field(r, where, "host_preprocess_ms", null=True) if "host_preprocess_ms" in r else (True, None),
        ]
        if not all(ok for ok, _ in checks):
            continue
        net, w, h, batch, ips, p50, gpu, host_prep = (v for _, v in checks)
        source = r.get("stages_source")
        stages, note = None, None
        if source is None:
            note = "n/a: not reported"
        elif not isinstance(source, str):
            rep.error(f"{where}: field stages_source is {json.dumps(source)}, not a string")
            continue
        elif source != "device events":
            note = f"n/a: {source}"
        else:
            ok, raw = rep.field(r, where, "stages_ms", kind=dict)
            if not ok:
                continue
            stages = {}
            for k in raw:
                ok, v = rep.field(raw, f"{where}: stages_ms", k)
                if ok:
                    stages[k] = v
            if len(stages) != len(raw):
                continue
            if not stages:
                rep.error(f"{where}: stages_source is device events, but stages_ms names no stage")
                continue
        inp = f"{w}x{h}"
        rows.append({
            "section": "engine", "name": net, "input": inp, "batch": batch, "backend": r.get("backend", ""),
            "images_per_s": ips, "end_to_end_p50_ms": p50,
            "gpu_ms_per_batch": gpu, "gpu_note": None if gpu is not None else (note or "n/a: not measured"),
            "host_preprocess_ms": host_prep,
            "stages_ms": stages, "stages_source": source, "stages_note": note,
            "status": "", "what": f"{r.get('measures', '')}; {r.get('backend', '')}", "source": where,
            "streamed": False,
        })
        streamed = r.get("pipelined_images_per_s")
        if streamed is not None:
            ok, streamed = rep.field(r, where, "pipelined_images_per_s")
            if ok:
                rows.append({
                    "section": "engine", "name": net, "input": inp, "batch": batch, "backend": r.get("backend", ""),
                    "images_per_s": streamed, "end_to_end_p50_ms": None,
                    "gpu_ms_per_batch": None, "gpu_note": "n/a: host clock", "host_preprocess_ms": None,
                    "stages_ms": None, "stages_source": "host clock", "stages_note": "n/a: host clock",
                    "status": "", "what": "host images -> detections, batches streamed (two in flight); images/s only",
                    "source": where, "streamed": True,
                })
    return rows


def anchor_rows(rep, required):
    rows = []
    for n, r in rep.jsonl("anchors.jsonl", required):
        runtime = str(r.get("runtime", "?"))
        ms = r.get("ms_per_batch_median")
        # PyTorch's times come from CUDA events around the forward pass; ONNX Runtime's from the host
        # clock around a run with its input and outputs bound on the device.
        events = runtime.startswith("pytorch")
        rows.append({
            "section": "anchor:" + runtime, "name": r.get("network", ""),
            "input": f'{r.get("width", "")}x{r.get("height", "")}', "batch": r.get("batch"),
            "images_per_s": r.get("images_per_s"),
            "end_to_end_p50_ms": None if events else ms, "gpu_ms_per_batch": ms if events else None,
            "status": "", "what": r.get("note", "") or ("input on the device, forward pass"),
            "source": f"{rep.path('anchors.jsonl')} line {n}",
        })
    return rows


def serve_rows(rep):
    rows = []
    log = rep.path("serve.log")
    if not os.path.exists(log):
        return rows
    with open(log, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.startswith("capacity"):
                continue
            try:
                v = float(line.split(":", 1)[1])
            except (IndexError, ValueError):
                rep.error(f"{log} line {n}: a capacity line without a number: {line.strip()[:120]!r}")
                continue
            rows.append({"section": "serve", "name": "retinaface_mv1_0.25.pth", "input": "trio.jpg",
                         "images_per_s": v, "status": "", "what": "best ok/s, max-batch 64"})
    return rows


def golden_rows(rep, name, required):
    return [{"section": name, "name": r.get("case", ""), "status": "PASS" if r.get("pass") else "FAIL",
             "what": json.dumps(r.get("max_err", r.get("error", "")))}
            for _, r in rep.jsonl(name + ".jsonl", required)]


def build(rep):
    rows = []
    if not os.path.exists(rep.path("steps.jsonl")):
        rep.error(f"{rep.path('steps.jsonl')}: missing (gpu-check writes it first: not a gpu-check output directory?)")
        return rows
    steps = rep.jsonl("steps.jsonl", True)
    for n, s in steps:
        where = f"{rep.path('steps.jsonl')} line {n}"
        checks = [rep.field(s, where, "step", kind=str), rep.field(s, where, "status", kind=str),
                  rep.field(s, where, "budget_s"), rep.field(s, where, "seconds"), rep.field(s, where, "what", kind=str)]
        if not all(ok for ok, _ in checks):
            continue
        name, status, budget, seconds, what = (v for _, v in checks)
        rows.append({"section": "step", "name": name, "status": status, "seconds": seconds, "budget_s": budget,
                     "what": what})
        # A step's output must exist once it passed; a failed or timed-out step keeps what it wrote.
        passed = status == "PASS"
        if name.startswith("sweep-"):
            rows += engine_rows(rep, name, passed)
        elif name == "anchors":
            rows += anchor_rows(rep, passed)
        elif name == "serve":
            rows += serve_rows(rep)
        elif name.startswith("goldens-"):
            rows += golden_rows(rep, name, passed)
    return rows


def stage_names(rows):
    seen = []
    for r in rows:
        for k in r.get("stages_ms") or {}:
            if k not in seen:
                seen.append(k)
    known = [k for k in STAGE_ORDER if k in seen]
    return known + [k for k in seen if k not in STAGE_ORDER]


def num(v, d):
    if v is None or v == "":
        return ""
    return f"{v:.{d}f}" if isinstance(v, float) else str(v)


def markdown(rows, names, meta, errors):
    dry = meta.get("dry_run", False)
    md = [f"gpu-check {'plan (dry run)' if dry else 'run'} at {meta.get('commit', 'unknown')}; "
          f"{meta.get('driver') or 'driver not recorded'}", ""]
    for e in errors:
        md.append(f"ERROR: {e}")
    if errors:
        md.append("")
    head = ["section", "name", "input", "batch", "images/s", "end-to-end ms / batch (p50, host clock)",
            "GPU ms / batch (CUDA events)", "host preprocess ms / batch"]
    head += [f"{k} ms / batch" for k in names]
    head += ["stages from", "status", "seconds", "notes"]
    md.append("| " + " | ".join(head) + " |")
    md.append("|" + "---|" * len(head))
    for r in rows:
        engine = r["section"] == "engine"
        stages = r.get("stages_ms")
        if engine and stages is None:
            stage_cells = [r["stages_note"]] * len(names)
        elif engine:
            stage_cells = [num(stages[k], 3) if k in stages else "n/a: not reported" for k in names]
        else:
            stage_cells = [""] * len(names)
        gpu = num(r.get("gpu_ms_per_batch"), 3) or (r.get("gpu_note") or "")
        host_prep = num(r.get("host_preprocess_ms"), 3) or ("n/a" if engine and not r["streamed"] else "")
        cells = [r["section"], r["name"], r.get("input", ""), num(r.get("batch"), 0), num(r.get("images_per_s"), 1),
                 num(r.get("end_to_end_p50_ms"), 3), gpu, host_prep] + stage_cells
        source = r.get("stages_source") or "not reported" if engine else ""
        cells += [source, r.get("status", ""),
                  num(r.get("seconds"), 1) if "seconds" in r else "", r.get("what", "")]
        md.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    meant = [f"{k}: {STAGE_MEANING[k]}" for k in names if k in STAGE_MEANING]
    if meant:
        md += ["", "Stages (device events on the compute stream, per batch): " + "; ".join(meant) + "."]
    return "\n".join(md) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--commit", help="the commit the run built (kept in run.json)")
    ap.add_argument("--driver", help="the driver check's line (kept in run.json)")
    ap.add_argument("--dry-run", action="store_true", help="the directory holds a dry run's plan")
    a = ap.parse_args()
    if not os.path.isdir(a.out_dir):
        print(f"gpu-check report: {a.out_dir}: not a directory", file=sys.stderr)
        return 1
    rep = Report(a.out_dir)
    meta_path = rep.path("run.json")
    if a.commit is not None or a.driver is not None or a.dry_run:
        meta = {"commit": a.commit or "unknown", "driver": a.driver or "", "dry_run": a.dry_run}
        with open(meta_path, "w") as f:
            json.dump(meta, f)
    elif os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            rep.error(f"{meta_path}: not a JSON object ({e})")
            meta = {}
    else:
        meta = {}
    rows = build(rep)
    names = stage_names(rows)
    report = {"commit": meta.get("commit", "unknown"), "driver": meta.get("driver", ""),
              "dry_run": meta.get("dry_run", False), "stage_names": names, "errors": rep.errors, "rows": rows}
    with open(rep.path("gpu-check.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(rows, names, meta, rep.errors)
    with open(rep.path("gpu-check.md"), "w") as f:
        f.write(md)
    print(md, end="")
    for e in rep.errors:
        print(f"gpu-check report: {e}", file=sys.stderr)
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
