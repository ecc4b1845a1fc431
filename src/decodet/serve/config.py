"""``ServeConfig``: every knob of the detection service, with the CLI's defaults."""

from __future__ import annotations

from dataclasses import dataclass

from decodet.errors import DecodetError


@dataclass
class ServeConfig:
    """Options of :func:`decodet.serve.create_app` (``decodet serve`` flags of the same names).

    Model:
        backend: ``"torch"``, ``"onnxruntime"`` or ``"openvino"`` (``None``: ONNX Runtime for
            ``.onnx`` files, OpenVINO for ``.xml``).
        precision: ``"fp32"``, ``"bf16"`` or ``"int8"`` (``None``: fp32 or the file's own).
        calib: int8 calibration image folder (``None``: synthetic noise, with a warning).
        compile: torch backend: ``torch.compile`` with weight freezing.
        device: torch device / ONNX Runtime provider (``"cpu"``, ``"cuda"``).
        imgsz: the fixed inference size (``None``: the model's own).
        max_det: detections the model keeps per image (a request may ask for fewer).
        threads: intra-op threads for inference (``None``: the library default).
    Answers:
        threshold: default score threshold of ``/v1/detect`` (a request may pass its own).
    Batching:
        max_batch: at most this many images share one forward pass.
        max_wait_ms: how long the first image of a batch waits for company.
        pad_batch: run every forward at exactly ``max_batch`` images (padding with copies),
            so that an image's answer never depends on its batch.  ``None``: pad on the
            torch and OpenVINO backends and on GPUs, whose kernels are chosen by batch size; ONNX Runtime's
            CPU kernels compute each image the same way whatever the batch, so no padding.
    Limits:
        max_queue: requests admitted and not yet answered; one more gets 503.
        timeout_s: a request not answered within this gets 504.
        max_upload_mb: a body over this gets 413.
        max_pixels: an image declaring more pixels gets 400 before it is decoded.
        api_key: when set, ``/v1/*`` and ``/metrics`` need ``X-API-Key: KEY`` or
            ``Authorization: Bearer KEY`` (401 otherwise).
    """

    backend: str | None = None
    precision: str | None = None
    calib: str | None = None
    compile: bool = False
    device: str = "cpu"
    imgsz: int | tuple[int, int] | None = None
    max_det: int = 100
    threads: int | None = None
    threshold: float = 0.3
    max_batch: int = 8
    max_wait_ms: float = 5.0
    pad_batch: bool | None = None
    max_queue: int = 64
    timeout_s: float = 30.0
    max_upload_mb: float = 10.0
    max_pixels: int = 40_000_000
    api_key: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_batch >= 1, f"max_batch must be at least 1, got {self.max_batch}"),
            (self.max_wait_ms >= 0, f"max_wait_ms must be >= 0, got {self.max_wait_ms}"),
            (self.max_queue >= 1, f"max_queue must be at least 1, got {self.max_queue}"),
            (self.timeout_s > 0, f"timeout_s must be > 0, got {self.timeout_s}"),
            (self.max_upload_mb > 0, f"max_upload_mb must be > 0, got {self.max_upload_mb}"),
            (self.max_pixels >= 1, f"max_pixels must be at least 1, got {self.max_pixels}"),
            (0.0 <= self.threshold <= 1.0, f"threshold must be in [0, 1], got {self.threshold}"),
            (self.max_det >= 1, f"max_det must be at least 1, got {self.max_det}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DecodetError(message)
        if self.api_key is not None and not self.api_key:
            raise DecodetError("api_key must not be empty (leave it unset for no key)")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
