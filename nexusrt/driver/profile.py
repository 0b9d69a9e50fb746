"""Hardware profiles: what the device is and what it can do.

``auto`` reads everything off the device's attributes. Named profiles are JSON files in
``profiles/`` with datasheet peaks used for reporting; asking for one that contradicts
the device found is an error naming the fields that differ.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources

from ..errors import ProfileMismatch

# How far the device's memory may sit from a profile's nominal size (drivers reserve some).
_MEMORY_TOLERANCE = 0.10


@dataclass
class HardwareProfile:
    """The device as NexusRT sees it. Bandwidths in bytes/s, sizes in bytes."""

    name: str
    backend: str
    device_name: str = ""
    compute_capability: tuple[int, int] = (0, 0)
    sm_count: int = 0
    memory_bytes: int = 0
    peak_bandwidth_bytes_s: float = 0.0
    peak_bandwidth_source: str = ""
    l2_bytes: int = 0
    shared_memory_per_block_optin: int = 0
    peak_bf16_flops: float = 0.0
    features: dict[str, bool] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        """NVRTC target for this device: ``sm_90a`` on Hopper (wgmma, setmaxnreg), else ``sm_XY``."""
        major, minor = self.compute_capability
        return f"sm_{major}{minor}a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"

    def to_json(self) -> dict:
        d = asdict(self)
        d["compute_capability"] = f"{self.compute_capability[0]}.{self.compute_capability[1]}"
        d["arch"] = self.arch
        return d


def profile_names() -> list[str]:
    """Names of the profiles shipped with the package."""
    files = resources.files(__package__).joinpath("profiles").iterdir()
    return sorted(os.path.splitext(f.name)[0] for f in files if f.name.endswith(".json"))


def load_named(name: str) -> dict:
    """The data of a named profile; an unknown name lists the valid ones."""
    names = profile_names()
    if name not in names:
        raise ValueError(f"unknown profile {name!r}: valid profiles are auto, {', '.join(names)}")
    text = resources.files(__package__).joinpath("profiles", f"{name}.json").read_text()
    return json.loads(text)


def cpu_profile() -> HardwareProfile:
    """The profile of the NumPy backend (no device peaks: CPU figures are labelled as such)."""
    import platform

    return HardwareProfile(
        name="cpu",
        backend="cpu",
        device_name=platform.processor() or platform.machine() or "cpu",
        memory_bytes=_host_memory_bytes(),
        features={},
    )


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def matches(data: dict, prof: HardwareProfile) -> list[str]:
    """Fields where the named profile ``data`` contradicts the measured profile ``prof``."""
    diffs = []
    if data.get("backend", "cuda") != prof.backend:
        diffs.append(f"backend: profile says {data.get('backend')}, device is {prof.backend}")
        return diffs
    if prof.backend == "cpu":
        return diffs
    cc = tuple(data["compute_capability"])
    if cc != tuple(prof.compute_capability):
        diffs.append(f"compute_capability: profile {cc[0]}.{cc[1]}, device "
                     f"{prof.compute_capability[0]}.{prof.compute_capability[1]}")
    if data["sm_count"] != prof.sm_count:
        diffs.append(f"sm_count: profile {data['sm_count']}, device {prof.sm_count}")
    gib = prof.memory_bytes / 2**30
    if not any(abs(gib - m) <= _MEMORY_TOLERANCE * m for m in data["memory_gib"]):
        diffs.append(f"memory: profile {data['memory_gib']} GiB, device {gib:.1f} GiB")
    return diffs


def identify(prof: HardwareProfile) -> str | None:
    """The first named profile that the measured profile matches, if any."""
    for name in profile_names():
        if not matches(load_named(name), prof):
            return name
    return None


def resolve(requested: str, measured: HardwareProfile) -> HardwareProfile:
    """Apply ``profile=`` to what the device reported.

    ``auto`` names the profile after the first shipped one the device matches (else
    ``custom``) and fills datasheet figures the driver cannot report. A named profile
    must agree with the device (``ProfileMismatch`` lists the fields otherwise).
    """
    if requested != "auto":
        data = load_named(requested)  # raises for unknown names
        diffs = matches(data, measured)
        if diffs:
            raise ProfileMismatch(
                f"profile {requested!r} does not match this device ({measured.device_name}): "
                + "; ".join(diffs)
            )
        name = requested
    else:
        name = identify(measured) or ("cpu" if measured.backend == "cpu" else "custom")
    measured.name = name
    if name not in ("custom",):
        data = load_named(name)
        measured.peak_bf16_flops = float(data.get("peak_bf16_flops", 0.0))
        if not measured.peak_bandwidth_bytes_s and data.get("peak_bandwidth_bytes_s"):
            measured.peak_bandwidth_bytes_s = float(data["peak_bandwidth_bytes_s"])
            measured.peak_bandwidth_source = f"datasheet ({name} profile)"
    return measured
