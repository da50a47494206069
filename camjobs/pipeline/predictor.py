"""The model stage: a Ray Data actor that predicts and computes the class activation maps.

Ray's batch-inference pattern: the model is loaded once in __init__, and __call__ maps
one decoded batch to result rows (an Arrow table in schema.RESULT_SCHEMA, heatmap and boxes
still empty: the localize stage fills them on CPUs). Rows that failed earlier pass through
as error rows, so every input reaches the sink.

The model runs with its BatchNorms folded into the convolutions before them
(camjobs.models.inference: one kernel less per pair). It and its input are channels_last
on every device: oneDNN's convolutions are faster in that layout on CPUs (a host batch,
permuted from NHWC, already is; a batch decoded on the device is made so), and tensor cores
want it on GPUs.
On a GPU the batch travels as uint8 through pinned memory (a quarter of float's bytes),
the model runs under bf16 autocast (precision "auto"), and a batch that
does not fit in the GPU's memory is split in halves until it does. With `--decode-on gpu`
the batch arrives as JPEG bytes and is decoded on the device (camjobs.pipeline.gpu_decode).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from camjobs.cam import CAMResult, build_extractor
from camjobs.config import PRECISIONS
from camjobs.models.inference import prepare_for_inference
from camjobs.models.networks import LoadedModel, load_model
from camjobs.schema import RESULT_SCHEMA, SCHEMA_VERSION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """How every actor rebuilds the same model (see camjobs.models.networks.load_model)."""

    checkpoint: str | None = None
    arch: str | None = None
    classes: tuple[str, ...] | None = None
    weights: str | None = None
    input_size: int | None = None

    def load(self) -> LoadedModel:
        return load_model(
            self.checkpoint,
            arch=self.arch,
            classes=list(self.classes) if self.classes else None,
            weights=self.weights,
            input_size=self.input_size,
        )


def choose_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the model's forward pass, or None for plain fp32.

    "auto" is bf16 on CUDA (tensor cores; the maps themselves are still computed in fp32
    from the bf16 features) and fp32 on a CPU, where bf16 is rarely faster.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


class CamPredictor:
    def __init__(
        self,
        spec: ModelSpec,
        *,
        method: str,
        threshold: float,
        target: str,
        run_id: str,
        torch_threads: int | None = None,
        precision: str = "auto",
    ):
        # Ray sets an actor's thread count from its num_cpus; a CPU actor that reserves
        # one CPU (to leave the rest to decode tasks) would run the model on one thread.
        if torch_threads:
            torch.set_num_threads(min(torch_threads, os.cpu_count() or torch_threads))
        self.device = choose_device()
        loaded = spec.load()
        self.autocast = autocast_dtype(precision, self.device)
        self.model = prepare_for_inference(loaded.model, self.device)
        self.classes = list(loaded.classes)
        self.class_index = {name: i for i, name in enumerate(self.classes)}
        self.model_sha256 = loaded.model_sha256
        self.input_size = loaded.input_size
        self.mean = torch.tensor(loaded.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(loaded.std, device=self.device).view(1, 3, 1, 1)
        self.extractor = build_extractor(method, self.model)
        self.method, self.threshold, self.target, self.run_id = method, float(threshold), target, run_id
        self.node_id = _ray_node_id()
        self.max_chunk = 1 << 30  # lowered for good after an out-of-memory error

    def _targets(self, labels: list) -> torch.Tensor | None:
        """Class indices to explain: the label's where asked for and known, else -1 (predicted)."""
        if self.target != "label":
            return None
        indices = [self.class_index.get(label, -1) if label is not None else -1 for label in labels]
        return torch.tensor(indices, dtype=torch.long, device=self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        count = len(batch["image_id"])
        error_type = list(batch["error_type"])
        error_message = list(batch["error_message"])
        columns: dict[str, list] = {name: [None] * count for name in RESULT_SCHEMA.names}
        skipped = [bool(v) for v in batch["skipped"]]
        width, height = [int(w) for w in batch["width"]], [int(h) for h in batch["height"]]
        good = [row for row in range(count) if error_type[row] is None and not skipped[row]]
        if good:
            pixels = self._model_input(batch, good, error_type, error_message, width, height)
            decoded = [i for i, row in enumerate(good) if error_type[row] is None]
            if len(decoded) < len(good):  # some failed to decode in here
                pixels, good = pixels[decoded], [good[i] for i in decoded]
            if good:
                self._explain(batch, pixels, good, columns, error_type, error_message)
        for name in ("image_id", "source_path", "label", "content_sha256", "file_size", "file_mtime_ns", "file_etag"):
            columns[name] = list(batch[name]) if name in batch else [None] * count
        ok = [e is None and not s for e, s in zip(error_type, skipped)]
        columns["width"] = [w if k else None for w, k in zip(width, ok)]
        columns["height"] = [h if k else None for h, k in zip(height, ok)]
        columns["error_type"], columns["error_message"] = error_type, error_message
        columns["run_id"] = [self.run_id] * count
        columns["schema_version"] = [SCHEMA_VERSION] * count
        columns["node_id"] = [self.node_id] * count
        columns["skipped"] = skipped
        if "refine_pixels" in batch:
            columns["refine_pixels"] = list(batch["refine_pixels"])
        return pa.table(columns, schema=RESULT_SCHEMA)

    def _model_input(
        self, batch, good: list[int], error_type, error_message, width, height
    ) -> np.ndarray | torch.Tensor:
        """The rows' pixels: uint8 (B, H, W, 3) on the host as decoded by the decode stage, or
        uint8 (B, 3, H, W) on the device, decoded here from their bytes. Rows that fail to
        decode here get an error and zero pixels; rows decoded here on the CPU get their size."""
        if "encoded" not in batch:
            # All rows good (the usual case): no gathering copy of the whole batch.
            pixels = batch["pixels"] if len(good) == len(batch["pixels"]) else batch["pixels"][good]
            return np.ascontiguousarray(pixels)
        from camjobs.pipeline.gpu_decode import decode_to_input

        pixels, errors, cpu_sizes = decode_to_input(
            [batch["encoded"][row] for row in good],
            [(width[row], height[row]) for row in good],
            [int(batch["orientation"][row]) for row in good],
            self.input_size,
            self.device,
            sources=[str(batch["source_path"][row]) for row in good],
        )
        for row, error, size in zip(good, errors, cpu_sizes):
            if error is not None:
                error_type[row], error_message[row] = error.error_type, str(error)
            elif size is not None:
                width[row], height[row] = size
        return pixels

    def _normalize(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) on the host, or (B, 3, H, W) on the device -> normalized float
        (B, 3, H, W) on the model's device."""
        if isinstance(pixels, torch.Tensor):
            images = pixels.float().div_(255.0)
        else:
            with warnings.catch_warnings():
                # Ray hands over read-only arrays (zero-copy from the object store); nothing
                # here writes to them: .float() and pin_memory() copy.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                images = torch.from_numpy(pixels)
            if self.device.type == "cuda":
                # pinned host memory makes the copy asynchronous and faster
                images = images.pin_memory().to(self.device, non_blocking=True)
            images = images.permute(0, 3, 1, 2).float().div_(255.0)
        return ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def _extract(self, pixels: np.ndarray | torch.Tensor, targets: torch.Tensor | None) -> CAMResult:
        """The extractor over the batch, split into halves while it does not fit in GPU memory."""
        chunk = min(self.max_chunk, len(pixels))
        while True:
            try:
                parts = [
                    self._extract_once(pixels[i : i + chunk], None if targets is None else targets[i : i + chunk])
                    for i in range(0, len(pixels), chunk)
                ]
                break
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    raise
                chunk = max(1, chunk // 2)
                self.max_chunk = chunk
                torch.cuda.empty_cache()
                log.warning("GPU out of memory: processing batches in pieces of %d images from now on", chunk)
        if len(parts) == 1:
            return parts[0]
        return CAMResult(*(torch.cat([getattr(p, f) for p in parts]) for f in ("logits", "target", "maps")))

    def _extract_once(self, pixels: np.ndarray | torch.Tensor, targets: torch.Tensor | None) -> CAMResult:
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None),
        ):
            return self.extractor(self._normalize(pixels), target=targets)

    def _explain(self, batch, pixels, good: list[int], columns, error_type, error_message) -> None:
        labels = [batch["label"][row] for row in good]
        result = self._extract(pixels, self._targets(labels))
        probabilities = torch.softmax(result.logits.float(), dim=1)
        pred_score, pred_index = probabilities.max(dim=1)
        maps = result.maps.float()
        finite = torch.isfinite(maps).flatten(1).all(dim=1).tolist()
        pred_index, pred_score = pred_index.tolist(), pred_score.tolist()
        probs_cpu = probabilities.cpu().numpy()  # float32, so that pred_score is exactly max(probs)
        targets = result.target.tolist()
        maps_cpu = maps.cpu().numpy()
        cam_height, cam_width = maps.shape[1:]
        for i, row in enumerate(good):
            if not finite[i]:
                error_type[row], error_message[row] = "model_error", "the class activation map has non-finite values"
                continue
            values = {
                "pred_index": pred_index[i],
                "pred_label": self.classes[pred_index[i]],
                "pred_score": pred_score[i],
                "probs": probs_cpu[i],
                "target_index": targets[i],
                "target_label": self.classes[targets[i]],
                "method": self.method,
                "cam": maps_cpu[i].ravel(),
                "cam_height": cam_height,
                "cam_width": cam_width,
                "threshold": self.threshold,
                "model_sha256": self.model_sha256,
                "target_mode": self.target,
                "input_size": self.input_size,
            }
            for name, value in values.items():
                columns[name][row] = value


def _ray_node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # usable without Ray: the node id is informational
        return os.uname().nodename
