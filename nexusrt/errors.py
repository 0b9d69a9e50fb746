"""The errors NexusRT raises. Every failure a user can cause or meet has a type here."""

from __future__ import annotations


class NexusRTError(RuntimeError):
    """Base class of every error NexusRT raises on purpose."""


class FatalError(NexusRTError):
    """An error after which a runner can never run another step (e.g. a tensor-parallel worker
    process died). The serving engine stops on it instead of ending only the step's requests."""


class NotInitialized(NexusRTError):
    """A runtime API was called before ``nrt.firmware.init()``."""

    def __init__(self, what: str = "this call"):
        super().__init__(
            f"{what} needs the runtime: call nrt.firmware.init() first "
            "(e.g. `import nexusrt as nrt; nrt.firmware.init(profile=\"auto\")`)"
        )


class BackendUnavailable(NexusRTError):
    """The requested backend cannot run on this machine (e.g. NEXUSRT_BACKEND=cuda without a driver)."""


class CudaError(NexusRTError):
    """A CUDA driver call failed. Carries the call, the error name and the driver's description."""

    def __init__(self, call: str, code: int, name: str, text: str):
        self.call, self.code, self.name, self.text = call, code, name, text
        super().__init__(f"{call} failed: {name} ({code}): {text}")


class CompileError(NexusRTError):
    """NVRTC rejected a kernel source. Carries the file, the options and the compiler log."""

    def __init__(self, source_name: str, options: list[str], log: str):
        self.source_name, self.options, self.log = source_name, list(options), log
        super().__init__(
            f"NVRTC could not compile {source_name}\n"
            f"options: {' '.join(options)}\n"
            f"log:\n{log.strip()}"
        )


class OutOfMemory(NexusRTError, MemoryError):
    """The arena cannot satisfy a request. States what was asked for and what was available."""

    def __init__(self, requested: int, available: int, where: str = "device arena", unit: str = "bytes"):
        # ``unit`` names what the two counts count: bytes for memory, "blocks" for the KV pools.
        self.requested, self.available, self.unit = requested, available, unit
        super().__init__(
            f"out of memory in the {where}: requested {requested} {unit}, "
            f"{available} {unit} available"
        )


class ProfileMismatch(NexusRTError):
    """A named hardware profile contradicts the device that was found."""


class ModelError(NexusRTError):
    """A checkpoint, config or tokenizer is missing, malformed or unsupported."""


class ModelTooLarge(ModelError, MemoryError):
    """The model and its KV cache need more memory than the backend has (both numbers kept)."""

    def __init__(self, message: str, needed: int, available: int):
        super().__init__(message)
        self.needed, self.available = needed, available


class SchedulerError(NexusRTError):
    """Submitted work failed or a barrier timed out."""


class NonFiniteLogits(NexusRTError):
    """A step's logits hold a NaN, so no token is defined (broken weights: NaN or inf values)."""


class InvalidArgument(ValueError):
    """An argument's value is outside what the call takes. ``argument`` names it as the caller
    spelled it (``"temperature"``, ``"kv_budget"``, ``"prompt"``), so a front end such as the
    server can point at its own field without reading the message."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


class InvalidArgumentType(InvalidArgument, TypeError):
    """An argument of a type the call does not take (a TypeError as well)."""


class RequestTooLarge(InvalidArgument):
    """A request's prompt and new tokens need more KV blocks than the engine's pool holds, so it
    could never run to its end; ``tokens`` and ``pool_tokens`` say by how much."""

    def __init__(self, message: str, tokens: int, pool_tokens: int):
        super().__init__("max_new_tokens", message)
        self.tokens, self.pool_tokens = tokens, pool_tokens
