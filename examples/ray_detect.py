"""Face detection over a collection of images with Ray Data and retinaface_rs.

Reads every JPEG/PNG under a directory (or any path Ray Data reads: s3://, gs://, a list of files) as
bytes, decodes them with the engine's own decoder inside the workers (the pixels `retinaface detect`
sees), runs one detector per worker through `map_batches`, and writes one row per image: its path, size
and detections (the command line's JSON) as JSON lines or Parquet.

    python examples/ray_detect.py IMAGES_DIR OUT_DIR --weights retinaface_mv1_0.25.pth [--concurrency 4]
        [--num-gpus 1] [--format json|parquet] [--batch-size 16] [--address auto]

On a cluster, pass --address auto (or a Ray address); each worker needs retinaface_rs installed.
"""

import argparse
import json


class Detector:
    """One engine per Ray worker, built once; each batch is decoded and detected in the worker."""

    def __init__(self, weights, network, backend, synthetic_seed, conf_threshold, resize):
        import retinaface_rs

        self.rf = retinaface_rs
        self.engine = retinaface_rs.Engine(
            weights, network=network, backend=backend, synthetic_seed=synthetic_seed
        )
        self.conf_threshold = conf_threshold
        self.resize = resize

    def __call__(self, batch):
        rows = {"path": [], "width": [], "height": [], "detections": [], "error": []}
        for path, data in zip(batch["path"], batch["bytes"]):
            rows["path"].append(path)
            try:
                image = self.rf.decode(bytes(data), name=path)
                dets = self.engine.detect(image, conf_threshold=self.conf_threshold, resize=self.resize)
                rows["height"].append(image.shape[0])
                rows["width"].append(image.shape[1])
                rows["detections"].append(json.dumps(dets))
                rows["error"].append("")
            except (ValueError, OSError) as e:
                # A bad file is reported in its row; the rest of the collection still runs.
                rows["height"].append(0)
                rows["width"].append(0)
                rows["detections"].append("[]")
                rows["error"].append(str(e))
        return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", help="directory (or Ray Data path) of JPEG/PNG images")
    p.add_argument("out", help="output directory")
    p.add_argument("--weights")
    p.add_argument("--synthetic-seed", type=int)
    p.add_argument("--network")
    p.add_argument("--backend", default="auto")
    p.add_argument("--conf-threshold", type=float, default=0.02)
    p.add_argument("--resize", default="original")
    p.add_argument("--format", choices=["json", "parquet"], default="json")
    p.add_argument("--concurrency", type=int, default=2, help="detector workers")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per worker (with --backend cuda)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local instance (default: all)")
    p.add_argument("--address", help="Ray cluster address (default: start a local instance)")
    a = p.parse_args(argv)
    if (a.weights is None) == (a.synthetic_seed is None):
        p.error("give --weights PATH or --synthetic-seed S")

    import ray

    ray.init(address=a.address, num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.read_binary_files(
            a.images, include_paths=True, file_extensions=["jpg", "jpeg", "png", "JPG", "JPEG", "PNG"]
        )
        gpus = {"num_gpus": a.num_gpus} if a.num_gpus > 0 else {}
        ds = ds.map_batches(
            Detector,
            fn_constructor_args=(a.weights, a.network, a.backend, a.synthetic_seed, a.conf_threshold, a.resize),
            batch_size=a.batch_size,
            concurrency=a.concurrency,
            batch_format="numpy",
            **gpus,
        )
        if a.format == "json":
            ds.write_json(a.out)
        else:
            ds.write_parquet(a.out)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
