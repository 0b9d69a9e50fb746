"""The tables of the kv stage's speed half (:mod:`.kv_speed` holds the figures and targets)."""

from __future__ import annotations

from .kv_speed import HOST_TARGET, HOST_TARGET_CONTEXT, LINK_TARGET, NOT_ASKED, PRUNED_TOLERANCE
from .table import table


def _ms(x) -> str:
    return f"{x:.3f}"


def _ring_row(ctx: str, label: str, r: dict) -> list:
    """The decode table's line of (b) or (f): ms/token and the ratio to (a), or skipped."""
    if "skipped" in r:
        return [ctx, label, "skipped (below)", "-", "-", "-", "-", "-", "-", "-"]
    return [ctx, label, _ms(r["ms_per_token"]), "-", "-", "-", "-", "-", f"{r['over_all_device']:.2f}x", "-"]


def _fault_note(ctx: str, b: dict) -> list[str]:
    if "skipped" in b:
        return [f"{ctx} (b): {b['skipped']}"]
    return [f"{ctx} (b): {b['measures']}; warm-up run {_ms(b['warmup_ms_per_token'])} ms/token including the "
            f"moving ({b['warmup_over_all_device']:.2f}x (a)); timed runs began with {b['host_entries_timed']:,} of "
            f"{b['blocks_host']:,} host blocks still read zero-copy; {b['blocks_reserve']:,} reserve blocks, ring of "
            f"{b['ring_slots']:,}; faults posted {b['faults_posted']:,}, serviced {b['faults_serviced']:,}, "
            f"overflow {b['faults_overflow']:,}, left {b['faults_left']:,}; {b['bytes_moved'] / 1e6:,.0f} MB moved" +
            _moves(b, "sharing the link with the steps' zero-copy reads of the blocks not moved yet") +
            (f"; the warm-up's closing flush took {_ms(b['flush_ms'])} ms and moved {b['flush_bytes'] / 1e6:,.0f} MB"
             if "flush_ms" in b else "")]


def _prefetch_note(ctx: str, f: dict) -> list[str]:
    if "skipped" in f:
        return [] if f["skipped"] == NOT_ASKED else [f"{ctx} (f): {f['skipped']}"]
    vs_b = (f" = {f['warmup_over_fault_ring_warmup']:.2f}x (b)'s warm-up" if "warmup_over_fault_ring_warmup" in f
            else "")
    wait = f", the first step waiting {_ms(f['prefetch_ms'])} ms for them" if "prefetch_ms" in f else ""
    return [f"{ctx} (f): the fill's sealed host blocks moved into the reserve as it ends{wait}; warm-up run "
            f"{_ms(f['warmup_ms_per_token'])} ms/token including the moving ({f['warmup_over_all_device']:.2f}x "
            f"(a)){vs_b}; {f['blocks_prefetched']:,} blocks prefetched, {f['faults_serviced']:,} moved by posts; "
            f"timed runs began with {f['host_entries_timed']:,} of {f['blocks_host']:,} host blocks still read "
            f"zero-copy" + _moves(f, "the link to themselves")]


def _moves(r: dict, how: str) -> str:
    """The fault ring's copies of a row: their device time and rate, if it moved anything."""
    if "move_bytes_s" not in r:
        return ""
    return (f"; the copies took {_ms(r['move_ms'])} ms on the control stream ({how}), "
            f"{r['move_bytes_s'] / 1e9:.1f} GB/s ({r['move_of_pinned']:.1%} of pinned)")


def _decode_rows(row: dict) -> list[list]:
    ctx, a, c = f"{row['context']:,}", row["all_device"], row["host_zero_copy"]
    out = [[ctx, "(a) all KV in HBM", _ms(a["ms_per_token"]), _ms(a["floor_ms"]), f"{a['fraction_of_floor']:.1%}",
            "-", "-", "-", "-", "-"],
           _ring_row(ctx, "(b) half on host, fault ring", row["fault_ring"])]
    if "skipped" in c:
        out.append([ctx, "(c) half on host, zero-copy", "skipped (below)", "-", "-", "-", "-", "-", "-", "-"])
    else:
        out.append([ctx, "(c) half on host, zero-copy", _ms(c["ms_per_token"]), _ms(c["floor_ms"]),
                    f"{c['fraction_of_floor']:.1%}", f"{c['host_bytes_per_token'] / 1e6:,.0f}",
                    f"{c['host_bytes_s'] / 1e9:.1f}", f"{c['of_pinned']:.1%}", f"{c['over_all_device']:.2f}x",
                    f"{c['floor_over_all_device_floor']:.2f}x"])
    f = row.get("prefetched", {"skipped": NOT_ASKED})
    if f.get("skipped") != NOT_ASKED:
        out.append(_ring_row(ctx, "(f) as (b), prefetched", f))
    return out


def render(s: dict) -> str:
    """The speed half's result as text: the decode table (a)-(c), restoring (d), pruned (e), notes."""
    if "skipped" in s:
        return f"speed: {s['skipped']}"
    measured = [r for r in s["contexts"] if "skipped" not in r]
    title = (f"KV speed on {s['model']} — {s['device']} ({s['backend']}, profile {s['profile']}); HBM read "
             f"{s['hbm_read_bytes_s'] / 1e9:,.0f} GB/s, pinned host->device {s['pinned_h2d_bytes_s'] / 1e9:.1f} GB/s "
             f"({s['pinned_copy']['bytes'] / 2**30:.0f} GiB copies, median of {s['pinned_copy']['reps']}), both "
             f"measured in this run; decode: median of {s['runs']} runs of {s['steps_per_run']} steps")
    parts = [table(["context", "mode", "ms/token", "floor ms", "of floor", "host MB/token", "host GB/s", "of pinned",
                    "vs (a)", "floor vs (a)"], [x for r in measured for x in _decode_rows(r)], title=title)]
    parts.append(table(["context", "evicted tokens", "MB", "recompute (prefill) ms", "copy back ms", "recompute / copy"],
                       [[f"{r['context']:,}", f"{d['evicted_tokens']:,}", f"{d['evicted_bytes'] / 1e6:,.0f}",
                         _ms(d["recompute_ms"]), _ms(d["copy_back_ms"]), f"{d['recompute_over_copy']:.2f}x"]
                        for r in measured for d in [r["restore"]] if "skipped" not in d],
                       title="(d) restoring the evicted half: its prefill, measured, vs its bytes at the pinned rate"))
    pruned = [(r["context"], r["pruned"]) for r in measured if "skipped" not in r["pruned"]]
    parts.append(table(["context", "slots kept", "RoPE positions", "unpruned ms/token", "pruned ms/token",
                        "pruned / unpruned", "target ±10%"],
                       [[f"{c:,}", f"{p['keep']:,}", f"{p['positions'][0]:,}..{p['positions'][1]:,}",
                         _ms(p["unpruned_ms_per_token"]), _ms(p["ms_per_token"]) if "ms_per_token" in p else "refused",
                         f"{p['over_unpruned']:.3f}" if "over_unpruned" in p else "-", p.get("target", "-")]
                        for c, p in pruned],
                       title="(e) pruned decode through CudaBatchRunner.run_tokens, one sequence"))
    notes = []
    for r in s["contexts"]:
        ctx = f"context {r['context']:,}"
        c, e = r.get("host_zero_copy", {}), r.get("pruned", {})
        notes += [f"{ctx} skipped: {r['skipped']}"] if "skipped" in r else _fault_note(ctx, r["fault_ring"])
        notes += _prefetch_note(ctx, r["prefetched"]) if "prefetched" in r else []
        notes += [f"{ctx} (c): {c['skipped']}"] if "skipped" in c else []
        notes += [f"{ctx} (d): {r['restore']['skipped']}"] if "skipped" in r.get("restore", {}) else []
        notes += [f"{ctx} (e): {e.get('skipped') or e['pruned_skipped']}"] if {"skipped", "pruned_skipped"} & set(e) else []
    t = s["targets"]
    h = t["host_over_device_32k"]
    notes.append(f"target (c) / (a) at {HOST_TARGET_CONTEXT:,} <= {HOST_TARGET}x (8B shape): " +
                 (h["skipped"] if "skipped" in h else f"{h['ratio']:.2f}x, {h['verdict']}; floor ratio "
                                                      f"{h['floor_ratio']:.2f}x — {h['note']}"))
    r = t["fault_ring_over_device_32k"]
    notes.append(f"target (b) / (a) at {HOST_TARGET_CONTEXT:,} <= {HOST_TARGET}x (8B shape): " +
                 (r["skipped"] if "skipped" in r else
                  f"{r['ratio']:.2f}x, {r['verdict']} — timed once the warm-up's faults had moved the host half "
                  f"into the reserve ({r['host_entries_timed']} host entries left); the warm-up run, moving "
                  f"included, was {r['warmup_ratio']:.2f}x"))
    link = t["host_link"]
    notes.append(f"target host->device traffic >= {LINK_TARGET:.0%} of the pinned rate: " +
                 (f"{link['verdict']} ({', '.join(f'{x:.1%}' for x in link['of_pinned'])})" if link["verdict"] else
                  "not measured"))
    mv = t["fault_moves"]
    shared = (f"; beside the steps' zero-copy reads of the same blocks (the fault-ring rows): "
              f"{', '.join(f'{x:.1%}' for x in mv['shared_of_pinned'])}" if mv.get("shared_of_pinned") else "")
    notes.append(f"target host->device traffic while faulting (the fault ring's copies alone on the link: the "
                 f"prefetched rows, else the fault-ring rows) "
                 f">= {LINK_TARGET:.0%} of the pinned rate: " +
                 (f"{mv['verdict']} ({', '.join(f'{x:.1%}' for x in mv['of_pinned'])}){shared}"
                  if mv["verdict"] else "not measured"))
    pr = t["pruned_like_kept"]
    notes.append(f"target pruned within ±{PRUNED_TOLERANCE:.0%} of the kept slots' speed: " +
                 (f"{pr['verdict']} ({', '.join(f'{x:.3f}' for x in pr['over_unpruned'])})" if pr["verdict"] else
                  "not measured"))
    return "\n\n".join(parts + ["\n".join(notes)])
