"""The agent daemon: the serving loop and everything it runs beside the tester (scoring, PAT, drift, shipping,
reload, shadow, audit), and the ``edge-agent`` command. It imports the contract (``package``, ``wire``) and the
shared basics (``errors``, ``checked``, ``keys``, ``logs``), never the trainer or the collector.
"""
