"""Edge inference runtime: the agent daemon and its client (this package's top level), the contract it shares
with the trainer and the collector (``package``: model packages; ``wire``: the score and stats protocols), and
the fleet collector (``collector``).

Importing it pulls in nothing heavy: a controller installs only numpy, onnxruntime, pyzmq, msgpack and
prometheus_client.
"""
__version__ = "0.1.0"
