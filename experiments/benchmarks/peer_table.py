"""The CPU-deployment table of a latency result: each backend beside torch's export on every
runtime, with the CPU and whether a competing job was running, as docs/latency.md shows it per
machine."""

from __future__ import annotations


def peer_table(result: dict) -> str:
    """Markdown: one line per row of `result` (experiments/benchmarks/latency.run_benchmark),
    end-to-end medians and the paired ratios to each peer and to the faster of them."""
    lines = [
        "| CPU | background load | backbone | input | batch | backend | end-to-end p50 ms "
        "| ms / frame | ORT (torch export) p50 ms | OpenVINO (torch export) p50 ms "
        "| ours / ORT | ours / OpenVINO | ours / best peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(row, key):
        return f"{row[key]['p50_ms']:.1f}" if row.get(key) else "-"

    def ratio(row, key):
        return f"{row[key]:.3f}" if key in row else "-"

    for r in result["rows"]:
        e = r["end_to_end"]
        best = {"onnxruntime_peer": "ORT", "openvino_peer": "OpenVINO"}.get(r.get("best_peer"))
        lines.append(
            f"| {r.get('cpu', result.get('cpu', '?'))} "
            f"| {'on' if r.get('background_load') else 'off'} "
            f"| {r['backbone']} | {r['image_size']} | {r['batch']} | {r.get('backend', 'xla')} "
            f"| {e['p50_ms']:.1f} "
            f"| {e['ms_per_frame']:.1f} | {ms(r, 'onnxruntime_peer')} | {ms(r, 'openvino_peer')} "
            f"| {ratio(r, 'ratio_vs_onnxruntime')} | {ratio(r, 'ratio_vs_openvino')} "
            f"| {ratio(r, 'ratio_vs_best_peer')}{f' ({best})' if best else ''} |"
        )
    return "\n".join(lines)
