"""Decode options, errors and the device: what every part of decoding (the worker included) agrees on."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from curator_assets.formats import schema

# The record schema's roles (whole extension, any case); kept here under their old names.
IMAGE_EXTENSIONS = schema.IMAGE_EXTENSIONS
CAPTION_EXTENSIONS = schema.CAPTION_EXTENSIONS
METADATA_EXTENSIONS = schema.METADATA_EXTENSIONS
DEFAULT_MAX_PIXELS = 100_000_000  # as validation's --max-pixels: larger images are never decoded

DEVICES = ("auto", "cpu", "gpu")
READERS = ("auto", "stream", "dali")
DEFAULT_BATCH_SIZE = 64  # on the CPU: enough to keep every core busy, small enough to stream
DEFAULT_GPU_BATCH_SIZE = 256  # nvJPEG and the hardware decoder want many images per call
DEFAULT_HW_DECODER_LOAD = 0.65  # DALI's own default share for the A100/H100 hardware JPEG decoder

# Reads closer than this are merged into one request: a gap costs less than another round trip.
LOCAL_GAP = 64 << 10
REMOTE_GAP = 1 << 20


class DecodeError(RuntimeError):
    """A shard that cannot be decoded at all (the message names it); records never raise this.
    ``code`` is a stable code (``not_a_tar``, ``tar_truncated``, ``idx_stale``, ...)."""

    code = "decode_failed"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class StaleIndexError(DecodeError):
    """The shard's ``.idx`` does not describe its tar (the tar changed after indexing)."""

    code = "idx_stale"


class DeviceUnavailableError(DecodeError):
    """``device="gpu"`` was asked for on a machine without a usable CUDA device."""

    code = "device_unavailable"


# ---------------------------------------------------------------------------------------------
# Options and the device


@dataclass(frozen=True)
class DecodeOptions:
    device: str = "auto"  # auto | cpu | gpu
    batch_size: int | None = None  # None: 64 on the CPU, 256 on a GPU
    num_threads: int | None = None  # DALI worker threads in all (split between the pipelines); None: one per core
    hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD
    # libjpeg-turbo's fast integer IDCT on the CPU path (and for images the GPU hands back to
    # it): ~7% more images/s measured here, at a small loss of accuracy (pixel values may
    # differ by a few levels). Off by default so that pixels match Pillow's decode.
    fast_idct: bool = False
    reader: str = "auto"  # auto (= stream) | stream | dali
    device_id: int = 0  # which GPU, when decoding on one
    prefetch: int = 2  # batches read ahead of the decoder
    # DALI pipelines decoding batches side by side, each with its share of the threads. One
    # pipeline leaves cores idle while a batch starts and ends (parsing, output allocation,
    # the last images of the batch); two keep them busy: +8-10% images/s measured on 2 cores.
    pipelines: int = 2
    # Images whose header declares more pixels are failed as image_too_large, never decoded.
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Decode in supervised worker processes (curator_assets.steps.decode.worker), so that a decoder
    # that dies on a corrupt image (SIGSEGV in a codec) fails that record, not the caller.
    # Decoded pixels come back through shared memory, on the host. Off: DALI runs in this
    # process (GPU images stay on the device). decode_shard and the CLI: on; iter_batches: off.
    contain_crashes: bool = True
    # Seconds a contained worker may spend on one batch (2 minutes more to start) without answering
    # before it is taken as hung (a codec in an endless loop): it is killed and the batch is
    # replayed one record at a time, so the record that hangs again fails "decoder hung".
    # Generous by default: a batch of large images on a few CPU cores takes tens of seconds.
    worker_timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.reader not in READERS:
            raise ValueError(f"reader must be one of {', '.join(READERS)}, not {self.reader!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {self.batch_size}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"threads must be at least 1, not {self.num_threads}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be between 0 and 1, not {self.hw_decoder_load}")
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {self.prefetch}")
        if self.pipelines < 1:
            raise ValueError(f"pipelines must be at least 1, not {self.pipelines}")
        if self.device_id < 0:
            raise ValueError(f"device_id must be 0 or more, not {self.device_id}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be at least 1, not {self.max_pixels}")
        if not self.worker_timeout > 0:
            raise ValueError(f"worker_timeout must be more than 0 seconds, not {self.worker_timeout}")

    @property
    def threads(self) -> int:
        return self.num_threads or available_cores()

    @property
    def threads_per_pipeline(self) -> int:
        return max(1, -(-self.threads // self.pipelines))

    def for_device(self, device: DeviceChoice) -> DecodeOptions:
        """These options with the batch size settled for ``device``."""
        if self.batch_size is not None:
            return self
        size = DEFAULT_GPU_BATCH_SIZE if device.name == "gpu" else DEFAULT_BATCH_SIZE
        return dataclasses.replace(self, batch_size=size)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class DeviceChoice:
    name: str  # "cpu" | "gpu"
    device_id: int | None  # None for the CPU: DALI then never touches CUDA
    reason: str  # why this device, for logs and the asset metadata

    @property
    def decoder_backend(self) -> str:
        return "mixed" if self.name == "gpu" else "cpu"


def cuda_device_count() -> int:
    """CUDA devices the driver shows this process (``CUDA_VISIBLE_DEVICES`` applies); 0 on a
    machine without a driver or GPU (never raises).

    Asked of the driver API (``libcuda``, which DALI loads too) rather than through DALI: the
    process that chooses the device need not import DALI at all when the decoders run in worker
    processes, and importing it only to count devices cost ~1.1 s of CPU per process here."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0
    try:
        import ctypes

        driver = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    except Exception:  # noqa: BLE001 - no driver, no libcuda, a broken install: all mean "no GPU"
        return 0


def resolve_device(device: str = "auto", device_id: int = 0) -> DeviceChoice:
    """The device to decode on. ``auto`` takes the GPU when one is usable; ``gpu`` insists."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cpu":
        return DeviceChoice("cpu", None, "CPU requested")
    count = cuda_device_count()
    if count > device_id:
        why = "GPU requested" if device == "gpu" else f"{count} CUDA device(s) found"
        return DeviceChoice("gpu", device_id, why)
    if device == "gpu":
        raise DeviceUnavailableError(
            f"--device gpu: no usable CUDA device {device_id} ({count} found); use --device auto or cpu"
        )
    return DeviceChoice("cpu", None, "no CUDA device found: CPU decoder")


