"""The benchmark's throwaway keys, made by the product's own key functions: a signing key for the benchmark
package (its agents trust only that key, as deployed agents do) and CURVE pairs for an agent and this process, for
the agents whose score socket is CURVE (``bench.curve_cost``)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from edge_agent.keys import (SigningKey, create_curve_pair, create_signing_key, load_curve_pair, load_curve_public,
                             load_signing_key)
from edge_agent.wire.links import CurveClient


@dataclass(frozen=True)
class BenchKeys:
    signer: SigningKey
    trusted: Path        # the signer's public key: every benchmark agent's trusted_keys
    agent_secret: Path   # the agents' CURVE key pair
    score_keys: Path     # the allow-list of a CURVE score socket: this process's public certificate
    client: CurveClient  # this process's keys for such a socket

    @classmethod
    def create(cls, folder: Path) -> BenchKeys:
        signing, trusted = create_signing_key(folder, "bench-trainer")
        agent_secret, agent_public = create_curve_pair(folder, "bench-agent")
        client_secret, client_public = create_curve_pair(folder, "bench-client")
        score_keys = folder / "score-keys"
        score_keys.mkdir()
        shutil.copy(client_public, score_keys)
        return cls(load_signing_key(signing), trusted, agent_secret, score_keys,
                   CurveClient(load_curve_pair(client_secret), load_curve_public(agent_public)))

    def agent_args(self, *, curve: bool) -> list[str]:
        """``edge-agent run`` options: trust the benchmark package's signer; with ``curve`` a CURVE score socket."""
        trust = ["--trusted-keys", str(self.trusted)]
        return trust + (["--key", str(self.agent_secret), "--score-keys", str(self.score_keys)] if curve else [])
