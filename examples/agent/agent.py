"""A small, deterministic MLflow agent for feedback-proxy's demo and tests.

It is a real `mlflow.genai.agent_server.AgentServer("ResponsesAgent")`: the same server code a
Databricks agent app runs, so the proxy sees exactly the wire format it will see in production
(SSE deltas, the `{"trace_id": ...}` event before `[DONE]` when asked with
`x-mlflow-return-trace-id: true`, `metadata.trace_id` in non-streaming answers). There is no
LLM and no network beyond the tracking server: the answer echoes the last user message in a few
chunks, with a configurable pause between chunks so that streaming is visible.

What it adds on top of the stock server, and why:

- The tracking URI and experiment are pinned at start-up. Left to resolve lazily, the first
  request would do it, and an agent whose tracking server is slow or down then stalls that
  request for minutes.
- The async trace flush interval is short (MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS,
  default here 200 ms instead of MLflow's 5 s), so a trace is searchable a fraction of a second
  after `[DONE]`; a vote cast right after an answer still meets a 404 first, but briefly.
- `custom_inputs.client_request_id` or an `x-client-request-id` header becomes the trace's
  client request id, so the proxy can find the trace by search when it has no trace id.
- `x-app-user-email` (set by the proxy) becomes the trace's user (`mlflow.trace.user`), and
  `context.conversation_id` its session.

Test hooks (deterministic, no randomness): a last user message starting with `!fail` streams one
chunk and then raises, which the agent server reports as `data: {"error": ...}` then `[DONE]`;
`custom_inputs.chunk_delay_ms` overrides the pause for one request.

Run: `python agent.py --port 5056 [--host 127.0.0.1]`, with MLFLOW_TRACKING_URI and
MLFLOW_EXPERIMENT_ID in the environment (see README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any, AsyncGenerator

# Read by MLflow when its trace exporter starts, i.e. after import: must be set first.
os.environ.setdefault("MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS", "200")

import mlflow  # noqa: E402
from mlflow.genai.agent_server import AgentServer, invoke, stream  # noqa: E402
from mlflow.genai.agent_server.utils import get_request_headers  # noqa: E402
from mlflow.pyfunc import ResponsesAgent  # noqa: E402
from mlflow.types.responses import (  # noqa: E402
    ResponsesAgentRequest,
    ResponsesAgentResponse,
    ResponsesAgentStreamEvent,
)

log = logging.getLogger("example-agent")

ITEM_ID = "msg_echo_1"
CHUNK_SIZE = 6
DEFAULT_CHUNK_DELAY_MS = int(os.environ.get("AGENT_CHUNK_DELAY_MS", "30"))
# Bounds what one request can make the agent do (this is a demo server, but it listens).
MAX_CHUNK_DELAY_MS = 5_000
MAX_ECHO_CHARS = 4_000


def last_user_text(request: ResponsesAgentRequest) -> str:
    """The text of the last user message ("" when there is none)."""
    for item in reversed(request.input):
        data = item.model_dump() if hasattr(item, "model_dump") else dict(item)
        if data.get("role") != "user":
            continue
        content = data.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            parts = [
                p.get("text", "")
                for p in content
                if isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text")
            ]
            return "".join(parts)
    return ""


def answer_for(request: ResponsesAgentRequest) -> str:
    return "echo: " + last_user_text(request)[:MAX_ECHO_CHARS]


def chunk_delay(request: ResponsesAgentRequest) -> float:
    raw = (request.custom_inputs or {}).get("chunk_delay_ms", DEFAULT_CHUNK_DELAY_MS)
    try:
        ms = int(raw)
    except (TypeError, ValueError):
        ms = DEFAULT_CHUNK_DELAY_MS
    return min(max(ms, 0), MAX_CHUNK_DELAY_MS) / 1000.0


def tag_trace(request: ResponsesAgentRequest) -> None:
    """Attach the proxy's correlation data to the trace the agent server opened for us."""
    headers = {k.lower(): v for k, v in get_request_headers().items()}
    custom = request.custom_inputs or {}
    client_request_id = custom.get("client_request_id") or headers.get("x-client-request-id")
    user = headers.get("x-app-user-email") or (request.context.user_id if request.context else None)
    session = request.context.conversation_id if request.context else None
    kwargs: dict[str, Any] = {}
    if isinstance(client_request_id, str) and client_request_id:
        kwargs["client_request_id"] = client_request_id
    if user:
        kwargs["user"] = user
    if session:
        kwargs["session_id"] = session
    if kwargs:
        mlflow.update_current_trace(**kwargs)


@invoke()
async def handle_invoke(request: ResponsesAgentRequest) -> ResponsesAgentResponse:
    tag_trace(request)
    text = answer_for(request)
    if last_user_text(request).startswith("!fail"):
        raise RuntimeError("agent failed (requested by !fail)")
    return ResponsesAgentResponse(
        output=[ResponsesAgent.create_text_output_item(text=text, id=ITEM_ID)],
        custom_outputs={"echoed_chars": len(text) - len("echo: ")},
    )


@stream()
async def handle_stream(
    request: ResponsesAgentRequest,
) -> AsyncGenerator[ResponsesAgentStreamEvent, None]:
    tag_trace(request)
    text = answer_for(request)
    delay = chunk_delay(request)
    fail = last_user_text(request).startswith("!fail")
    for i in range(0, len(text), CHUNK_SIZE):
        if i and delay:
            await asyncio.sleep(delay)
        yield ResponsesAgentStreamEvent(
            **ResponsesAgent.create_text_delta(delta=text[i : i + CHUNK_SIZE], item_id=ITEM_ID)
        )
        if fail:
            raise RuntimeError("agent failed mid-stream (requested by !fail)")
    yield ResponsesAgentStreamEvent(
        type="response.output_item.done",
        item=ResponsesAgent.create_text_output_item(text=text, id=ITEM_ID),
    )


agent_server = AgentServer("ResponsesAgent")
app = agent_server.app


def pin_tracking() -> None:
    """Resolve the tracking server and experiment now, not on the first request."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if not uri or not experiment_id:
        sys.exit("example agent: set MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID")
    mlflow.set_tracking_uri(uri)
    # Raises (and so exits non-zero) when the server is unreachable or the experiment is
    # unknown: better a failed start than a server that hangs on its first request.
    experiment = mlflow.set_experiment(experiment_id=experiment_id)
    log.info(
        "tracing to %s, experiment %s (%s), flush interval %s ms",
        uri,
        experiment.experiment_id,
        experiment.name,
        os.environ["MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="feedback-proxy example agent")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5056)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    pin_tracking()
    import uvicorn

    # Not AgentServer.run(): that binds 0.0.0.0 and parses its own arguments.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
