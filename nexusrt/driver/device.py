"""The device: a CUDA device with its primary context, or the host CPU."""

from __future__ import annotations

from .calls import call, cu
from .profile import HardwareProfile, cpu_profile


class Device:
    """One compute device. ``backend`` is ``"cuda"`` or ``"cpu"``.

    For CUDA it holds the device handle and the retained primary context; ``close()``
    releases the context and is safe to call twice.
    """

    def __init__(self, backend: str, ordinal: int = 0):
        self.backend = backend
        self.ordinal = ordinal
        self.handle = None
        self.context = None
        self.driver_version = 0
        if backend == "cuda":
            self.handle = call("cuDeviceGet", ordinal)
            self.driver_version = int(call("cuDriverGetVersion"))

    # -- context ---------------------------------------------------------------------
    def open_context(self) -> None:
        """Retain the primary context and make it current on this thread."""
        if self.backend != "cuda" or self.context is not None:
            return
        self.context = call("cuDevicePrimaryCtxRetain", self.handle)
        call("cuCtxSetCurrent", self.context)

    def make_current(self) -> None:
        """Bind the context to the calling thread (each thread that launches needs it)."""
        if self.context is not None:
            call("cuCtxSetCurrent", self.context)

    def synchronize(self) -> None:
        if self.context is not None:
            call("cuCtxSynchronize")

    def close(self) -> None:
        if self.context is not None:
            self.context = None
            call("cuDevicePrimaryCtxRelease", self.handle)

    # -- what it is ---------------------------------------------------------------------
    def attribute(self, name: str) -> int:
        """A ``CU_DEVICE_ATTRIBUTE_<name>`` value."""
        attr = getattr(cu().CUdevice_attribute, f"CU_DEVICE_ATTRIBUTE_{name}")
        return int(call("cuDeviceGetAttribute", attr, self.handle))

    def _attribute_or(self, name: str, default: int) -> int:
        try:
            return self.attribute(name)
        except Exception:  # attribute unknown to this driver or bindings
            return default

    def measure_profile(self) -> HardwareProfile:
        """Read a profile off the device attributes (``auto``)."""
        if self.backend == "cpu":
            return cpu_profile()
        name = call("cuDeviceGetName", 256, self.handle)
        name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
        major = self.attribute("COMPUTE_CAPABILITY_MAJOR")
        minor = self.attribute("COMPUTE_CAPABILITY_MINOR")
        mem_bytes = int(call("cuDeviceTotalMem", self.handle))
        clock_khz = self._attribute_or("MEMORY_CLOCK_RATE", 0)
        bus_bits = self._attribute_or("GLOBAL_MEMORY_BUS_WIDTH", 0)
        # Double data rate: two transfers per memory clock.
        peak_bw = clock_khz * 1e3 * 2 * bus_bits / 8 if clock_khz and bus_bits else 0.0
        features = {
            "vmm": bool(self._attribute_or("VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED", 0)),
            "tensor_maps": bool(self._attribute_or("TENSOR_MAP_ACCESS_SUPPORTED", 0)),
            "clusters": bool(self._attribute_or("CLUSTER_LAUNCH", 0)),
            # The V1 attribute reads 0 on CUDA 12+ drivers where the stream memory
            # operations are always available (verified on the lent H100).
            "stream_mem_ops": self.driver_version >= 12000
            or bool(self._attribute_or("CAN_USE_STREAM_MEM_OPS_V1", 0)),
            "gpudirect_rdma": bool(self._attribute_or("GPU_DIRECT_RDMA_SUPPORTED", 0)),
            "compressible_memory": bool(self._attribute_or("GENERIC_COMPRESSION_SUPPORTED", 0)),
        }
        return HardwareProfile(
            name="auto",
            backend="cuda",
            device_name=name,
            compute_capability=(major, minor),
            sm_count=self.attribute("MULTIPROCESSOR_COUNT"),
            memory_bytes=mem_bytes,
            peak_bandwidth_bytes_s=peak_bw,
            peak_bandwidth_source="memory clock x bus width" if peak_bw else "",
            l2_bytes=self._attribute_or("L2_CACHE_SIZE", 0),
            shared_memory_per_block_optin=self._attribute_or("MAX_SHARED_MEMORY_PER_BLOCK_OPTIN", 0),
            features=features,
        )

    def __repr__(self) -> str:
        return f"Device(backend={self.backend!r}, ordinal={self.ordinal})"
