"""The DALI engine: one pipeline that decodes a batch of encoded images, in this process.

Below both the shard decoder and the crash-containment worker (which imports only this and the options).
"""

from __future__ import annotations

import functools
import io
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from curator_assets.steps.decode.options import DecodeOptions, DeviceChoice

# ---------------------------------------------------------------------------------------------
# DALI


def dali_api():
    from nvidia.dali import fn, pipeline_def, types

    return fn, pipeline_def, types


def import_dali() -> None:
    """Import what building a decoder needs of DALI (no pipeline, no thread, no CUDA call)."""
    dali_api()
    _tensor_list_cpu()


def _tensor_list_cpu():
    from nvidia.dali.tensors import TensorListCPU

    return TensorListCPU


def decoder_args(device: DeviceChoice, options: DecodeOptions) -> dict[str, Any]:
    """``fn.decoders.image`` arguments: RGB out, EXIF orientation applied (DALI's default, stated
    here because the manifest's width and height depend on it)."""
    _, _, types = dali_api()
    args: dict[str, Any] = {"device": device.decoder_backend, "output_type": types.RGB, "adjust_orientation": True}
    if device.decoder_backend == "mixed":
        args["hw_decoder_load"] = options.hw_decoder_load
    if options.fast_idct:
        args["use_fast_idct"] = True
    return args


class BatchDecodeFailed(RuntimeError):
    """DALI failed a run; the message is DALI's, shortened."""

    crashed = False  # True: the decoder process died on the batch (see curator_assets.steps.decode.worker)


def short_dali_error(exc: BaseException) -> str:
    text = str(exc)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if "no longer valid" not in ln and not ln.startswith("Critical error")]
    first = lines[0] if lines else type(exc).__name__
    # The sample number is the position in DALI's batch, which means nothing to the reader.
    return re.sub(r"\s*sample #\d+\s*:?", " sample", first).strip()[:300]


def explain_failure(data: bytes | memoryview) -> str:
    """A readable reason for bytes DALI could not decode (DALI only reports a status code)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()
    except Exception as exc:  # noqa: BLE001 - any decoder error is the explanation we want
        return f"{type(exc).__name__}: {exc}"[:300]
    return "Pillow decodes it"


class ImageDecoder:
    """A DALI pipeline that decodes one batch of encoded images at a time, fed from Python."""

    def __init__(self, device: DeviceChoice, options: DecodeOptions):
        self.device = device
        self.options = options
        self.pipe = None
        self.builds = 0

    def build(self) -> None:
        fn, pipeline_def, types = dali_api()
        kwargs = decoder_args(self.device, self.options)

        # prefetch_queue_depth=1 and the dynamic executor: a failed run leaves the pipeline
        # usable, and outputs stay valid while referenced.
        @pipeline_def(batch_size=self.options.batch_size, num_threads=self.options.threads_per_pipeline,
                      device_id=self.device.device_id, prefetch_queue_depth=1, exec_dynamic=True)
        def pipeline():
            # no_copy: the batch handed in is a TensorListCPU made for this run alone.
            encoded = fn.external_source(name="encoded", device="cpu", no_copy=True, dtype=types.UINT8)
            return fn.decoders.image(encoded, **kwargs)

        self.pipe = pipeline()
        self.pipe.build()
        self._tensor_list = _tensor_list_cpu()
        self.builds += 1

    def run(self, arrays: Sequence[np.ndarray], keep_pixels: bool = True):
        """Decode; returns DALI's output batch or raises :class:`BatchDecodeFailed`.
        (``keep_pixels`` matters to a contained decoder only: its pixels cross a process.)"""
        if self.pipe is None:
            self.build()
        try:
            # One copy into one buffer, in C++: a list of arrays costs DALI ~5 us of Python per sample.
            self.pipe.feed_input("encoded", self._tensor_list(list(arrays), ""))
            (out,) = self.pipe.run()
        except RuntimeError as exc:
            # Start again from a fresh pipeline: cheap (milliseconds), and nothing carries over.
            self.pipe = None
            raise BatchDecodeFailed(short_dali_error(exc)) from exc
        return out


def failure_reason(exc: BatchDecodeFailed, image: np.ndarray) -> str:
    """A record's error when it failed on its own. A crashed decoder says only that (and the
    signal): nothing else may touch bytes that kill a codec."""
    if exc.crashed:
        return str(exc)
    return f"DALI could not decode the image ({exc}); Pillow: {explain_failure(image)}"


def output_shapes(out) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in s) for s in out.shape()]


def output_images(out, device: DeviceChoice) -> list:
    if device.name == "gpu":
        return [out[i] for i in range(len(out))]  # TensorGPU: __dlpack__ / __cuda_array_interface__
    # Views, no copy: with DALI's dynamic executor an output buffer lives as long as a view of it.
    return [np.asarray(out[i]) for i in range(len(out))]


DALI_DISTRIBUTIONS = ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")


@functools.cache
def dali_version() -> str:
    """The installed DALI's version, for the manifest. Read from the package metadata: this
    process may never import DALI (its decoders run in worker processes), and importing it only
    for the version cost ~1.2 s of CPU per command."""
    dali = sys.modules.get("nvidia.dali")
    if dali is not None:
        return str(getattr(dali, "__version__", "unknown"))
    from importlib import metadata

    for name in DALI_DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


