"""The plain in-process loops of bench.py: read + decode + resize, the model (or a CAM method), and
the boxes, batch by batch in one process; and the paired loop, every method on each batch in turn.

Methods: bare (the forward alone), bare-unfolded (the model as loaded, BatchNorms not folded),
cj-cam / cj-gradcam (camjobs' extractors), torchcam (torchcam.methods.CAM), gradcam-lib
(pytorch_grad_cam.GradCAM, target layer model.layer4[-1], targets = the predicted class). Every
loop but bare-unfolded gets the model prepared as the job runs it
(camjobs.models.inference.prepare_for_inference), so that the ratios compare methods, not preparations.
"""

from __future__ import annotations

import os
import resource
import time

from benchmarks.harness import peak_rss_mib

PAIRED = ("bare", "cj-cam", "cj-gradcam", "torchcam", "gradcam-lib")
LOOPS = ("bare", "bare-unfolded", "cj-cam", "cj-gradcam", "torchcam", "gradcam-lib")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_method(variant: str, model, size: int):
    """A function from a normalized (B, 3, H, W) batch to (B, h, w) maps (any scale), or None for (a)."""
    import torch

    if variant in ("bare", "bare-unfolded"):

        def method(images):
            with torch.inference_mode():
                model(images)
            return None
    elif variant in ("cj-cam", "cj-gradcam"):
        from camjobs.cam import build_extractor

        extractor = build_extractor(variant.removeprefix("cj-"), model, probe_size=size)

        def method(images):
            with torch.inference_mode():  # as the actor runs: the extractors handle grad themselves
                return extractor(images).maps
    elif variant == "torchcam":
        from torchcam.methods import CAM

        from camjobs.cam import locate_head

        head = locate_head(model, probe_size=size)
        extractor = CAM(
            model, target_layer=head.target_name, fc_layer=head.classifier_name, input_shape=(3, size, size)
        )

        def method(images):
            with torch.inference_mode():
                logits = model(images)
            return extractor(class_idx=logits.argmax(dim=1).tolist())[0]
    elif variant == "gradcam-lib":
        from pytorch_grad_cam import GradCAM

        if hasattr(model, "layer4"):
            layer = model.layer4[-1]
        else:
            from camjobs.cam import locate_head

            layer = model.get_submodule(locate_head(model, probe_size=size).target_name)
        extractor = GradCAM(model=model, target_layers=[layer])

        def method(images):
            return torch.from_numpy(extractor(input_tensor=images, targets=None))  # None: the predicted class
    else:
        raise SystemExit(f"unknown loop variant {variant}")
    return method


class Setup:
    """What every loop shares: torch threads, the readable records, the model as loaded, and the
    normalization CamPredictor applies."""

    def __init__(self, args, limit: int | None = None):
        import torch

        from camjobs.layouts import list_images
        from camjobs.models.networks import load_model

        self.threads = args.threads or os.cpu_count() or 1
        torch.set_num_threads(self.threads)
        self.batch = args.batch_size
        self.records = [r for r in list_images(args.data).records if r.error_type is None][:limit]
        self.loaded = load_model(arch=args.model, classes=args.classes.split(","), input_size=args.input_size)
        self.size = self.loaded.input_size
        self.mean = torch.tensor(self.loaded.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(self.loaded.std).view(1, 3, 1, 1)

    def normalize(self, pixels):
        import torch

        return (torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0) - self.mean) / self.std

    def warm(self, method) -> None:
        """One untimed batch: oneDNN primitive creation, allocator growth."""
        import numpy as np

        method(
            self.normalize(
                np.random.default_rng(0).integers(0, 255, (self.batch, self.size, self.size, 3), dtype=np.uint8)
            )
        )

    def batches(self):
        """(decoded images, their normalized batch, decode seconds) batch by batch."""
        import numpy as np

        from camjobs.images import load_image

        for first in range(0, len(self.records), self.batch):
            t0 = time.perf_counter()
            decoded = [
                load_image(r.source_path, input_size=self.size) for r in self.records[first : first + self.batch]
            ]
            images = self.normalize(np.stack([d.pixels for d in decoded]))
            yield decoded, images, time.perf_counter() - t0


def localize_all(maps, decoded) -> int:
    """The boxes of each map at its image's size (camjobs.pipeline.localize.localize); how many."""
    from camjobs.pipeline.localize import localize

    if maps is None:
        return 0
    maps = maps.detach().float().cpu()
    return sum(len(localize(maps[i], d.height, d.width).boxes) for i, d in enumerate(decoded))


def run_paired(args) -> dict:
    """Every loop method on every batch, in rotating order, in one process: ratios under the same load.

    Each method gets its own copy of the model (camjobs' gradcam turns parameter gradients off,
    pytorch-grad-cam needs them on). Decode is done once per batch and timed once."""
    import copy

    from camjobs.models.inference import prepare_for_inference

    setup = Setup(args, limit=args.paired_images)
    methods = {v: build_method(v, prepare_for_inference(copy.deepcopy(setup.loaded.model)), setup.size) for v in PAIRED}
    for method in methods.values():
        setup.warm(method)
    model_s, localize_s, decode_s = dict.fromkeys(PAIRED, 0.0), dict.fromkeys(PAIRED, 0.0), 0.0
    load_start, started = os.getloadavg()[0], time.time()
    for index, (decoded, images, decode_time) in enumerate(setup.batches()):
        decode_s += decode_time
        for variant in PAIRED[index % len(PAIRED) :] + PAIRED[: index % len(PAIRED)]:
            t1 = time.perf_counter()
            maps = methods[variant](images.clone())
            t2 = time.perf_counter()
            localize_all(maps, decoded)
            model_s[variant] += t2 - t1
            localize_s[variant] += time.perf_counter() - t2
    elapsed = time.time() - started
    return {
        "variant": "paired",
        "images": len(setup.records),
        "seconds": elapsed,
        "images_per_s": len(setup.records) / elapsed,  # all five methods per image
        "decode_s": decode_s,
        "model_s": model_s,
        "localize_s": localize_s,
        "torch_threads": setup.threads,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
    }


def run_loop(variant: str, args) -> dict:
    """(a), (c), (d), cj-cam, cj-gradcam: read/decode/resize, then the model, then boxes, batch by batch."""
    from camjobs.models.inference import prepare_for_inference

    setup_started = time.time()
    setup = Setup(args)
    model = setup.loaded.model.eval() if variant == "bare-unfolded" else prepare_for_inference(setup.loaded.model)
    method = build_method(variant, model, setup.size)
    setup.warm(method)
    setup_s = time.time() - setup_started
    load_start, cpu_before = os.getloadavg()[0], _cpu_s()
    timings, boxes = {"decode_s": 0.0, "model_s": 0.0, "localize_s": 0.0}, 0
    started = time.time()
    for decoded, images, decode_time in setup.batches():
        t1 = time.perf_counter()
        maps = method(images)
        t2 = time.perf_counter()
        boxes += localize_all(maps, decoded)
        timings["decode_s"] += decode_time
        timings["model_s"] += t2 - t1
        timings["localize_s"] += time.perf_counter() - t2
    elapsed = time.time() - started
    return {
        "variant": variant,
        "images": len(setup.records),
        "seconds": elapsed,
        "images_per_s": len(setup.records) / elapsed,
        "setup_s": setup_s,
        "cpu_s": _cpu_s() - cpu_before,
        "peak_rss_mib": peak_rss_mib(),
        "torch_threads": setup.threads,
        "boxes": boxes,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        **{k: round(v, 3) for k, v in timings.items()},
    }
