"""The model stage: a Ray Data actor that predicts, computes maps, upsamples and boxes.

Ray's batch-inference pattern: the model is loaded once in __init__, and __call__ maps
one decoded batch to result rows (an Arrow table in schema.RESULT_SCHEMA). Rows that
failed earlier pass through as error rows, so every input reaches the sink.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from camjobs.cam import build_extractor
from camjobs.localize import encode_png, localize
from camjobs.models import LoadedModel, load_model
from camjobs.schema import RESULT_SCHEMA, SCHEMA_VERSION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """How every actor rebuilds the same model (see camjobs.models.load_model)."""

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
    ):
        # Ray sets an actor's thread count from its num_cpus; a CPU actor that reserves
        # one CPU (to leave the rest to decode tasks) would run the model on one thread.
        if torch_threads:
            torch.set_num_threads(min(torch_threads, os.cpu_count() or torch_threads))
        self.device = choose_device()
        loaded = spec.load()
        self.model = loaded.model.to(self.device).eval()
        self.classes = list(loaded.classes)
        self.class_index = {name: i for i, name in enumerate(self.classes)}
        self.model_sha256 = loaded.model_sha256
        self.input_size = loaded.input_size
        self.mean = torch.tensor(loaded.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(loaded.std, device=self.device).view(1, 3, 1, 1)
        self.extractor = build_extractor(method, self.model)
        self.method, self.threshold, self.target, self.run_id = method, float(threshold), target, run_id
        self.node_id = _ray_node_id()

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
        good = [row for row in range(count) if error_type[row] is None and not skipped[row]]
        if good:
            self._explain(batch, good, columns, error_type, error_message)
        for name in ("image_id", "source_path", "label", "content_sha256"):
            columns[name] = list(batch[name])
        ok = [e is None and not s for e, s in zip(error_type, skipped)]
        columns["width"] = [int(w) if k else None for w, k in zip(batch["width"], ok)]
        columns["height"] = [int(h) if k else None for h, k in zip(batch["height"], ok)]
        columns["error_type"], columns["error_message"] = error_type, error_message
        columns["run_id"] = [self.run_id] * count
        columns["schema_version"] = [SCHEMA_VERSION] * count
        columns["node_id"] = [self.node_id] * count
        columns["skipped"] = skipped
        return pa.table(columns, schema=RESULT_SCHEMA)

    @torch.no_grad()
    def _normalize(self, pixels: np.ndarray) -> torch.Tensor:
        images = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        images = images.permute(0, 3, 1, 2).float().div_(255.0)
        return (images - self.mean) / self.std

    def _explain(self, batch, good: list[int], columns, error_type, error_message) -> None:
        images = self._normalize(np.ascontiguousarray(batch["pixels"][good]))
        labels = [batch["label"][row] for row in good]
        result = self.extractor(images, target=self._targets(labels))
        probabilities = torch.softmax(result.logits.float(), dim=1)
        pred_score, pred_index = probabilities.max(dim=1)
        maps = result.maps.float()
        finite = torch.isfinite(maps).flatten(1).all(dim=1).tolist()
        pred_index, pred_score = pred_index.tolist(), pred_score.tolist()
        targets = result.target.tolist()
        maps_cpu = maps.cpu().numpy()
        cam_height, cam_width = maps.shape[1:]
        for i, row in enumerate(good):
            if not finite[i]:
                error_type[row], error_message[row] = "model_error", "the class activation map has non-finite values"
                continue
            located = localize(maps[i], int(batch["height"][row]), int(batch["width"][row]), self.threshold)
            values = {
                "pred_index": pred_index[i],
                "pred_label": self.classes[pred_index[i]],
                "pred_score": pred_score[i],
                "target_index": targets[i],
                "target_label": self.classes[targets[i]],
                "method": self.method,
                "cam": maps_cpu[i].ravel(),
                "cam_height": cam_height,
                "cam_width": cam_width,
                "heatmap_png": encode_png(located.heatmap),
                "threshold": self.threshold,
                "boxes": [box.as_dict() for box in located.boxes],
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
