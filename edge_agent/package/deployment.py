"""Deployments: which version each group of testers runs, and which challenger runs in shadow beside it.

A model's stages (registry.py) say what production is; a deployment narrows it per group of testers::

    <root>/<name>/deployment.json
    {"name": "m", "updated_at": "...",
     "groups": {"canary": {"version": "2", "previous": null, "agents": ["tester-a", "tester-b"], "percent": 0.0}},
     "shadow": {"version": "3", "agents": [], "percent": 100.0}}

An agent belongs to a group when its agent id or tester name is listed, or when its place on the fleet's hash line
(``fleet_position``: the sha256 of the agent id, as a number in [0, 100)) is below the group's ``percent``. The
position does not depend on the group or the model, so a canary that grows from 5 % to 50 % keeps the testers it
had. Every agent in no group runs the production version. A shadow challenger is scored beside the champion on the
agents it selects the same way. Every change is a line in the model's history (who, when, why) through the
registry's own lock and recorder, and a group remembers its previous version: rolling a group back is one change
of this file, and the agents hold that version in their cache already.

stdlib only (the registry service and the agent read it).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ..errors import RegistryError
from .files import atomic_write
from .manifest import NAME_PATTERN
from .registry import PackageRef, Registry

DEPLOYMENT_FILE = "deployment.json"
PRODUCTION = "production"            # the implicit group: every agent that no other group selects
SHADOW = "shadow"


@dataclass(frozen=True)
class Selection:
    """Which agents a group (or the shadow) selects: listed agent ids or testers, and a share of the fleet."""

    agents: tuple[str, ...] = ()
    percent: float = 0.0

    def selects(self, agent_id: str, tester: str) -> bool:
        return agent_id in self.agents or tester in self.agents or fleet_position(agent_id) < self.percent

    def describe(self) -> str:
        listed = ", ".join(self.agents)
        share = f"{self.percent:g} % of the fleet" if self.percent else ""
        return " and ".join(part for part in (listed, share) if part) or "no agent"


@dataclass(frozen=True)
class Assignment:
    """What one agent runs: its group, the champion that decides and the challenger scored in shadow (or None)."""

    group: str
    champion: PackageRef
    challenger: PackageRef | None = None


@dataclass
class Deployment:
    name: str
    groups: dict[str, dict] = field(default_factory=dict)    # group -> {version, previous, agents, percent}
    shadow: dict | None = None                                # {version, agents, percent}

    def assign(self, agent_id: str, tester: str, production: str | None) -> Assignment:
        """The agent's assignment; ``production``: the version in the production stage (None: there is none)."""
        group, version = PRODUCTION, production
        for name, entry in self.groups.items():
            if _selection(entry).selects(agent_id, tester):
                group, version = name, entry["version"]
                break
        if version is None:
            raise RegistryError(f"model {self.name!r}: agent {agent_id!r} is in no deployment group and no version is "
                                "in production")
        challenger = None
        if self.shadow is not None and _selection(self.shadow).selects(agent_id, tester) \
                and self.shadow["version"] != version:
            challenger = PackageRef(self.name, self.shadow["version"])
        return Assignment(group, PackageRef(self.name, version), challenger)

    def to_document(self) -> dict:
        return {"name": self.name, "groups": self.groups, "shadow": self.shadow}


def fleet_position(agent_id: str) -> float:
    """The agent's place in [0, 100) on the fleet's hash line: a group of ``percent`` % takes the agents below it.

    >>> 0 <= fleet_position("tester-07") < 100
    True
    >>> fleet_position("tester-07") == fleet_position("tester-07")
    True
    """
    return int.from_bytes(hashlib.sha256(agent_id.encode()).digest()[:8], "big") / 2 ** 64 * 100


def read_deployment(registry: Registry, name: str) -> Deployment:
    path = registry.root / name / DEPLOYMENT_FILE
    try:
        document = json.loads(path.read_bytes())
        return Deployment(name, dict(document.get("groups") or {}), document.get("shadow"))
    except FileNotFoundError:
        return Deployment(name)
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise RegistryError(f"{path}: unreadable deployment ({error!r})") from error


def assignment(registry: Registry, name: str, agent_id: str, tester: str) -> Assignment:
    """What ``agent_id`` (on ``tester``) runs of model ``name`` now."""
    production = [v for v, s in registry.stages(name).items() if s == PRODUCTION]
    return read_deployment(registry, name).assign(agent_id, tester, max(production, key=int) if production else None)


# ---- changes (edge-train registry deploy / shadow / rollback --group) -------------------------------------------

def deploy(registry: Registry, name: str, group: str, version: str, reason: str, *, agents: tuple[str, ...] = (),
           percent: float = 0.0, signer=None) -> Deployment:
    """Make ``group`` run ``version`` on the agents it selects (listed ids or testers, a share of the fleet)."""
    _check_group(group)
    _check_selection(agents, percent)
    with registry.locked(name):
        ref = registry.resolve(name, version=version)
        registry.require_verified(ref, f"deployed to {group}")
        deployment = read_deployment(registry, name)
        before = deployment.groups.get(group)
        previous = before["version"] if before is not None and before["version"] != ref.version else (
            before or {}).get("previous")
        deployment.groups[group] = {"version": ref.version, "previous": previous, "agents": list(agents),
                                    "percent": float(percent)}
        _save(registry, deployment, ref.version, group, "deploy", reason, Selection(tuple(agents), percent), signer,
              from_stage=None if before is None else f"{group} v{before['version']}")
    return deployment


def rollback_group(registry: Registry, name: str, group: str, reason: str, *, signer=None) -> Deployment:
    """Give ``group`` its previous version back; a group that had none is removed (its agents run production)."""
    _check_group(group)
    with registry.locked(name):
        deployment = read_deployment(registry, name)
        entry = deployment.groups.get(group)
        if entry is None:
            raise RegistryError(f"model {name!r} has no deployment group {group!r} to roll back "
                                f"(groups: {', '.join(deployment.groups) or 'none'})")
        if entry.get("previous"):
            deployment.groups[group] = {**entry, "version": entry["previous"], "previous": None}
            version, action = entry["previous"], "group_rollback"
        else:
            del deployment.groups[group]
            version, action = entry["version"], "undeploy"
        _save(registry, deployment, version, group if action != "undeploy" else PRODUCTION, action, reason,
              _selection(entry), signer, from_stage=f"{group} v{entry['version']}")
    return deployment


def set_shadow(registry: Registry, name: str, version: str | None, reason: str, *, agents: tuple[str, ...] = (),
               percent: float = 0.0, signer=None) -> Deployment:
    """Score ``version`` in shadow on the agents selected (None: stop shadow scoring)."""
    with registry.locked(name):
        deployment = read_deployment(registry, name)
        before = deployment.shadow
        if version is None:
            if before is None:
                raise RegistryError(f"model {name!r} has no shadow challenger to stop")
            deployment.shadow = None
            version, selection = before["version"], _selection(before)
        else:
            _check_selection(agents, percent)
            ref = registry.resolve(name, version=version)
            registry.require_verified(ref, "scored in shadow")
            version, selection = ref.version, Selection(tuple(agents), percent)
            deployment.shadow = {"version": version, "agents": list(agents), "percent": float(percent)}
        _save(registry, deployment, version, SHADOW if deployment.shadow else "-", "shadow", reason, selection,
              signer, from_stage=None if before is None else f"shadow v{before['version']}")
    return deployment


def _save(registry: Registry, deployment: Deployment, version: str, to: str, action: str, reason: str,
          selection: Selection, signer, *, from_stage: str | None) -> None:
    """History first (registry.record), then the deployment file, replaced atomically."""
    registry.record(deployment.name, [{"action": action, "version": version, "from_stage": from_stage,
                                       "to_stage": to, "reason": reason, "agents": selection.describe()}],
                    signer=signer)
    document = deployment.to_document()
    atomic_write(registry.root / deployment.name / DEPLOYMENT_FILE, (json.dumps(document, indent=2) + "\n").encode())


def _selection(entry: dict) -> Selection:
    return Selection(tuple(entry.get("agents") or ()), float(entry.get("percent") or 0.0))


def _check_group(group: str) -> None:
    if group in (PRODUCTION, SHADOW) or not NAME_PATTERN.fullmatch(group):
        raise RegistryError(f"invalid deployment group {group!r}: expected a name such as canary (letters, digits, "
                            f"'.', '_', '-'), not {PRODUCTION!r} (the stage) or {SHADOW!r}")


def _check_selection(agents: tuple[str, ...], percent: float) -> None:
    if not 0.0 <= percent <= 100.0:
        raise RegistryError(f"percent: expected a share of the fleet in 0..100, got {percent}")
    if not agents and not percent:
        raise RegistryError("a group needs agents (agent ids or tester names) or a percent of the fleet")
