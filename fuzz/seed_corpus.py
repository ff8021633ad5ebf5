#!/usr/bin/env python3
"""Writes a seed corpus for the `inspector` fuzz target into fuzz/corpus/inspector/.

Seeds are the real captures in tests/fixtures/samples (bodies derived as in tests/inspector.rs:
an HTTP status line + headers before the first blank line, and a capture tool's trailing
`HTTP <code> total=…` line, are not part of the body) plus a few synthetic shapes, each behind
the target's 10-byte header (mode/cap, largest frame, split seed).
"""
import pathlib
import re

root = pathlib.Path(__file__).resolve().parent
samples = root.parent / "tests" / "fixtures" / "samples"
out = root / "corpus" / "inspector"
out.mkdir(parents=True, exist_ok=True)


def body(raw: bytes) -> bytes:
    if raw.startswith(b"HTTP/"):
        raw = raw.split(b"\r\n\r\n", 1)[1]
    return re.sub(rb"\nHTTP \d{3} total=[^\n]*\n\Z", b"", raw)


def head(flags: int, max_frame: int, seed: int) -> bytes:
    return bytes([flags, max_frame]) + seed.to_bytes(8, "big")


bodies = []
for p in sorted(samples.glob("*.sse.txt")):
    # The chat app template's UI message streams run in the target's UI mode (bit 6).
    bodies.append((0x47 if "_ai_sdk_app_" in p.name else 0x07, body(p.read_bytes())))
for p in sorted(samples.glob("100_*.txt")):
    bodies.append((0x87, body(p.read_bytes())))
tid = b"tr-0123456789abcdef0123456789abcdef"
synthetic = [
    b'data: {"trace_id": "' + tid + b'"}\r\n\r\ndata: [DONE]\r\n\r\n',
    b'\xef\xbb\xbf: ping\r\rdata: {"trace_id":\rdata: "' + tid + b'"}\r\r',
    b'event: response.output_item.done\ndata: {"type":"response.output_item.done","item":{},'
    b'"databricks_output":{"trace":{"info":{"trace_id":"trace:/main.agents/0a1b"}}}}\n\n',
    b'data: {"type": "trace.client_request_id", "client_request_id": "req-1"}\n\n',
    b'data: {"trace_id": "MLFLOW_NO_OP_SPAN_TRACE_ID"}\n\ndata: {"trace_id": "tr-\\u0000"}\n\n',
]
for s in synthetic:
    bodies.append((0x07, s))
bodies.append((0x87, b'{"databricks_output":{"trace":{"info":{"trace_id":"' + tid + b'"}}}}'))

bodies.append((0x47, b'data: {"type":"start","messageId":"m-1"}\n\ndata: {"type":"data-traceId","data":null}\n\n'))
bodies.append((0x47, b'data: {"type":"data-x","data":{"traceId":"' + tid + b'"}}\r\n\r\n'))

for i, (flags, b) in enumerate(bodies):
    for j, (cap, frame) in enumerate([(flags, 255), (flags & 0xC0 | 0x04, 3), (flags, 0)]):
        (out / f"seed-{i:02}-{j}").write_bytes(head(cap, frame, 0x9E3779B97F4A7C15 + j) + b)
print(f"{len(bodies) * 3} seeds in {out}")
