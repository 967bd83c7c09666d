"""The floor of every agent latency figure: a bare pyzmq ROUTER in its own process that sends each request back.

The same payload over the same transport between two processes, with nothing done to it: what a reply costs
before the agent does any work. Started by ``bench.cadence`` beside the agent, measured in the same run.

    python -m bench.echo tcp://127.0.0.1:5599
"""
from __future__ import annotations

import signal
import sys

import zmq


def serve(endpoint: str) -> None:
    """Echo every message (a DEALER's [identity, payload]) until SIGTERM."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            router.send_multipart(router.recv_multipart(copy=False), copy=False)
    finally:
        router.close()
        context.term()


if __name__ == "__main__":
    serve(sys.argv[1])
