"""``ServeConfig``: every knob of the detection service, with the CLI's defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from decodet.runtime.options import RunOptions, option


@dataclass
class ServeConfig(RunOptions):
    """Options of :func:`decodet.serve.create_app` (``decodet serve`` flags of the same names):
    how the model runs (:class:`~decodet.runtime.options.RunOptions`; ``score_threshold`` is
    the default of ``/v1/detect``, a request may pass its own, and ``max_det`` the most a
    request may ask for), and:

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

    max_batch: int = option(8, "images per forward pass at most")
    max_wait_ms: float = option(5.0, "how long a batch waits to fill")
    pad_batch: bool | None = field(default=None)
    max_queue: int = option(64, "waiting requests at most; more get 503")
    timeout_s: float = option(30.0, "requests not answered by then get 504")
    max_upload_mb: float = option(10.0, "larger uploads get 413")
    max_pixels: int = option(40_000_000, "larger declared images get 400")
    api_key: str | None = option(None, "require this key (or set DECODET_API_KEY)")

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            *super()._checks(),
            (self.max_batch >= 1, f"max_batch must be at least 1, got {self.max_batch}"),
            (self.max_wait_ms >= 0, f"max_wait_ms must be >= 0, got {self.max_wait_ms}"),
            (self.max_queue >= 1, f"max_queue must be at least 1, got {self.max_queue}"),
            (self.timeout_s > 0, f"timeout_s must be > 0, got {self.timeout_s}"),
            (self.max_upload_mb > 0, f"max_upload_mb must be > 0, got {self.max_upload_mb}"),
            (self.max_pixels >= 1, f"max_pixels must be at least 1, got {self.max_pixels}"),
            (self.api_key is None or bool(self.api_key), "api_key must not be empty (leave it unset for no key)"),
        ]

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
