"""``nexusrt-bench --stage detect``: what the runtime found and how long boot took."""

from __future__ import annotations

from .table import human_bytes, table

OPTIONS = frozenset()  # none besides main's COMMON: any other option given with it is refused


def run(args) -> dict:
    from .. import firmware

    dev = firmware.init(profile=args.profile, backend=args.backend)
    rt = firmware.runtime()
    p = dev.profile
    return {
        "backend": rt.backend,
        "backend_reason": rt.probe_reason,
        "profile": p.name,
        "device": {
            "name": p.device_name,
            "compute_capability": f"{p.compute_capability[0]}.{p.compute_capability[1]}",
            "arch": p.arch if rt.is_cuda else None,
            "sm_count": p.sm_count,
            "memory_bytes": p.memory_bytes,
            "peak_bandwidth_bytes_s": p.peak_bandwidth_bytes_s,
            "peak_bandwidth_source": p.peak_bandwidth_source,
            "l2_bytes": p.l2_bytes,
            "shared_memory_per_block_optin": p.shared_memory_per_block_optin,
            "driver_version": dev.driver_version,
        },
        "features": dict(p.features),
        "boot_s": dict(rt.boot_s),
    }


def render(r: dict) -> str:
    d = r["device"]
    rows = [
        ["backend", f"{r['backend']} ({r['backend_reason']})"],
        ["profile", r["profile"]],
        ["device", d["name"]],
    ]
    if r["backend"] == "cuda":
        drv = d["driver_version"]
        rows += [
            ["compute capability", f"{d['compute_capability']} ({d['arch']})"],
            ["SMs", d["sm_count"]],
            ["memory", human_bytes(d["memory_bytes"])],
            ["peak bandwidth", f"{d['peak_bandwidth_bytes_s'] / 1e12:.2f} TB/s ({d['peak_bandwidth_source']})"],
            ["L2", human_bytes(d["l2_bytes"])],
            ["smem/block (opt-in)", human_bytes(d["shared_memory_per_block_optin"])],
            ["driver", f"CUDA {drv // 1000}.{drv % 1000 // 10}"],
        ]
    else:
        rows.append(["memory", human_bytes(d["memory_bytes"])])
    out = [table(["", ""], rows, title="NexusRT device")]
    if r["features"]:
        out.append(table(["feature", "available"], [[k, "yes" if v else "no"] for k, v in r["features"].items()]))
    out.append(table(["boot phase", "ms"], [[k, v * 1e3] for k, v in r["boot_s"].items()]
                     + [["total", sum(r["boot_s"].values()) * 1e3]]))
    return "\n\n".join(out)
