"""Edge inference runtime. Layout:

- ``daemon``: the agent daemon beside the tester (serving loop, scoring, PAT, drift, shipping, reload, shadow,
  audit) and the ``edge-agent`` command;
- ``client``: the test program's side of the score protocol (``AgentClient``);
- shared basics every program uses: ``errors``, ``checked`` (configuration objects checked before any work, read
  from TOML), ``keys`` (key files), ``logs``, ``processes`` (start and stop the agent and collector), ``summary``;
- the contract the agent shares with the trainer and the collector: ``package`` (model packages: manifest,
  registry, signatures, deployments) and ``wire`` (the score, stats, audit and packages protocols);
- ``collector`` (the fleet's stats collector) and ``fleet`` (packages to controllers without a shared disk).

The daemon imports the contract and the shared basics, never the trainer (tests/test_boundary.py). Importing this
package pulls in nothing; a controller installs only the libraries of setup.py's ``AGENT`` list.
"""
__version__ = "0.1.0"
