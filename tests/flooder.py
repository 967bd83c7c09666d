"""A flooding client for tests/test_hostile.py: many DEALER connections from one process, each sending one request
(the bytes of a file) again and again as fast as ZeroMQ takes it, never reading a reply, until stdin closes.

    python tests/flooder.py --connect tcp://127.0.0.1:5555 --connections 20 --request request.msgpack

Prints one JSON line when it stops: {"sent": requests handed to ZeroMQ}. The test runs it at nice 19: what is
measured is the agent's fairness, not how the operating system shares the two cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import zmq


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connect", required=True)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--request", required=True, help="file holding the request to send")
    args = parser.parse_args()
    payload = zmq.Frame(open(args.request, "rb").read())
    context = zmq.Context()
    sockets = []
    for _ in range(args.connections):
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(args.connect)
        sockets.append(socket)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print(json.dumps({"connected": len(sockets), "pid": os.getpid()}), flush=True)
    sent = 0
    while not stop.is_set():
        progress = False
        for socket in sockets:
            try:
                socket.send(payload, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue
            sent += 1
            progress = True
        if not progress:
            time.sleep(0.001)   # every queue is full: the agent holds the flood back
    for socket in sockets:
        socket.close()
    context.term()
    print(json.dumps({"sent": sent}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
