"""JPEG decoding on the model's device, for the model actor (`--decode-on gpu`).

On a GPU machine the CPUs, not the GPU, limit the pipeline, and JPEG decoding is the largest
CPU cost per image. With `--decode-on gpu` the decode stage only reads, hashes and checks each
file's header (camjobs.images); the model actor decodes its whole batch at once with nvJPEG
(torchvision.io.decode_jpeg on a CUDA device), turns each image upright by its EXIF
orientation, and resizes it to the model's input there (bilinear with antialiasing, i.e.
averaging when shrinking, like the CPU path). A file the device decoder refuses (not a JPEG,
CMYK, lossless, corrupt) is decoded on the actor's CPU as the decode stage would have done.
On a CPU device the same code decodes with libjpeg-turbo, which is how it is tested without a GPU.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from camjobs.images import ImageInputError, decode_reduced, resize_for_model

# Full-size pixels decoded per device call: 6000x4000 photographs, 256 to a batch, would need
# 18 GB at once; groups of at most this many pixels (~0.8 GB as RGB) are decoded and resized
# in turn.
MAX_PIXELS_PER_CALL = 256_000_000


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image turned upright by its EXIF orientation tag (1-8), as Pillow's exif_transpose."""
    if orientation == 2:
        return image.flip(2)
    if orientation == 3:
        return image.flip(1, 2)
    if orientation == 4:
        return image.flip(1)
    if orientation == 5:
        return image.transpose(1, 2)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(1, 2))
    if orientation == 7:
        return image.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(1, 2))
    return image


def resize_on_device(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) or (C, H, W) uint8 -> (..., C, size, size) uint8: each image squashed whole,
    as decode.resize_for_model does."""
    batch = images if images.dim() == 4 else images[None]
    resized = F.interpolate(batch.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    resized = resized.round_().clamp_(0, 255).to(torch.uint8)
    return resized if images.dim() == 4 else resized[0]


def _decode_group(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEGs to (3, H, W) uint8 on the device; None for each one the decoder refuses."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision >= 0.29 warns on every call that decoding moves to TorchCodec
        try:
            if device.type == "cuda":
                # Nothing queued may still read memory the decoder is handed (it writes on its own stream).
                torch.cuda.current_stream(device).synchronize()
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return list(images)
        except RuntimeError:
            if len(data) == 1:
                return [None]
    # One bad file fails the whole call: find it by decoding the others one at a time.
    return [image for one in data for image in _decode_group([one], device)]


def decode_to_input(
    encoded: list[bytes],
    sizes: list[tuple[int, int]],
    orientations: list[int],
    input_size: int,
    device: torch.device,
    sources: list[str] | None = None,
) -> tuple[torch.Tensor, list[ImageInputError | None], list[tuple[int, int] | None]]:
    """A batch of encoded images -> the model's uint8 input (B, 3, S, S) on `device`.

    sizes are the (width, height) after orientation from each header (decode.inspect_header),
    used to group the device calls; sources name the files in error messages.
    Returns the input (rows that failed are zeros), each row's error (None when decoded), and
    the (width, height) after orientation of rows decoded on the CPU instead (None otherwise).
    """
    count = len(encoded)
    out = torch.zeros((count, 3, input_size, input_size), dtype=torch.uint8, device=device)
    errors: list[ImageInputError | None] = [None] * count
    cpu_sizes: list[tuple[int, int] | None] = [None] * count
    jpeg, refused = [], []  # refused: decoded on the CPU instead (not a JPEG, or nvJPEG said no)
    for i in range(count):
        (jpeg if encoded[i][:2] == b"\xff\xd8" else refused).append(i)
    start = 0
    while start < len(jpeg):
        group, pixels = [], 0
        while start < len(jpeg) and (
            not group or pixels + sizes[jpeg[start]][0] * sizes[jpeg[start]][1] <= MAX_PIXELS_PER_CALL
        ):
            group.append(jpeg[start])
            pixels += sizes[jpeg[start]][0] * sizes[jpeg[start]][1]
            start += 1
        data = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in group]
        by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
        for i, image in zip(group, _decode_group(data, device)):
            if image is None:
                refused.append(i)
            else:
                upright = orient(image, orientations[i])
                by_shape.setdefault(tuple(upright.shape), []).append((i, upright))
        # One resize per image size (a whole HAM10000 batch is 600x450): fewer, larger kernels.
        for same in by_shape.values():
            out[[i for i, _ in same]] = resize_on_device(torch.stack([image for _, image in same]), input_size)
    for i in sorted(refused):
        source = sources[i] if sources else ""
        try:
            # The decode stage checked the header against --max-pixels; the file may decode to
            # no more pixels than its header says (not to the default limit, which may be lower).
            rgb, width, height = decode_reduced(
                encoded[i], input_size, max_pixels=sizes[i][0] * sizes[i][1], source=source
            )
        except ImageInputError as exc:
            errors[i] = exc
            continue
        except Exception as exc:  # as in the decode stage: one unexpected failure must not take the batch down
            errors[i] = ImageInputError("decode_error", f"{type(exc).__name__}: {exc} ({source})")
            continue
        out[i] = torch.from_numpy(np.ascontiguousarray(resize_for_model(rgb, input_size))).permute(2, 0, 1).to(device)
        cpu_sizes[i] = (width, height)
    return out, errors, cpu_sizes
