"""What the collector stores of the model lifecycle: audit batches (one ``decisions`` row per decision) and the shadow
challenger's agreement counts that travel with drift windows (``shadow_sites``); and the queries over them that
``edge-collector audit`` prints. Tables: SCHEMA.md. Called inside the receive loop's transactions.
"""
from __future__ import annotations

import sqlite3

from ..wire.audit import FIELDS
from ..wire.codec import encode

AUDIT_COLUMNS = ("time", "agent_id", "tester", "head", "site", "lot", "sublot", "wafer", "x", "y", "part_id",
                 "model_name", "model_version", "model_checksum", "outlier_score", "pass_probability", "bin", "flags",
                 "digest")


def add_audit(db: sqlite3.Connection, batch: dict, received_at: float) -> tuple[int, int] | None:
    """Store one audit batch (inside a transaction): None if (agent, stream, seq) is stored already, else (the
    agent's audit loss before this batch, its loss now): batches dropped from its spool or lost before it."""
    spool = batch["spool"]
    key = (batch["agent_id"], spool["stream"], batch["seq"])
    if db.execute("SELECT 1 FROM audit_batches WHERE agent_id = ? AND stream = ? AND seq = ?", key).fetchone():
        return None
    before = db.execute("SELECT max(dropped_total + unspooled_lost) FROM audit_batches WHERE agent_id = ? AND "
                        "stream = ?", key[:2]).fetchone()[0] or 0
    cursor = db.execute("INSERT INTO audit_batches (agent_id, stream, seq, tester, received_at, records, "
                        "dropped_total, unspooled_lost) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (*key, batch["tester"], received_at, len(batch["records"]), spool["dropped_total"],
                         spool["unspooled_lost"]))
    models = batch["models"]
    index = {name: i for i, name in enumerate(FIELDS)}
    rows = []
    for record in batch["records"]:
        model = models[record[index["model"]]]
        rows.append((cursor.lastrowid, batch["agent_id"], batch["tester"], record[index["time"]],
                     record[index["head"]], record[index["site"]],
                     *(_text(record[index[key]]) for key in ("lot", "sublot", "wafer")),
                     record[index["x"]], record[index["y"]], _text(record[index["part_id"]]),
                     record[index["digest"]].hex(),
                     model["name"], model["version"], model["checksum"], record[index["outlier_score"]],
                     record[index["pass_probability"]], record[index["bin"]], ",".join(record[index["flags"]])))
    db.executemany("INSERT INTO decisions (batch_id, agent_id, tester, time, head, site, lot, sublot, wafer, x, y, "
                   "part_id, digest, model_name, model_version, model_checksum, outlier_score, pass_probability, bin, "
                   "flags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return before, spool["dropped_total"] + spool["unspooled_lost"]


def add_shadow(db: sqlite3.Connection, window_id: int, message: dict) -> None:
    """The ``shadow`` blocks of a stored window (inside its transaction)."""
    for block in message.get("shadow") or ():
        champion, challenger = block["champion"], block["challenger"]
        for i, site in enumerate(block["sites"]):
            sums = site["score_sums"]
            db.execute(f"INSERT INTO shadow_sites VALUES ({', '.join('?' * 27)})",
                       (window_id, message["agent_id"], message["tester"], message["window"]["end"],
                        champion["checksum"], champion["version"], challenger["name"], challenger["version"],
                        challenger["checksum"], site["head"], site["site"], site["parts"], site["agree"],
                        encode(site["confusion"]), sums["n"], sums["sx"], sums["sy"], sums["sxx"], sums["syy"],
                        sums["sxy"], *site["outliers"], *site["fails"], *site["pat_disagree"],
                        block["skipped"] if i == 0 else 0))


def _text(value) -> str | None:
    return None if value is None else str(value)


# ---- edge-collector audit ------------------------------------------------------------------------------------

def audit_rows(db: sqlite3.Connection, *, part: str | None = None, lot: str | None = None,
               wafer: str | None = None, model: str | None = None, version: str | None = None,
               limit: int = 10_000) -> list[sqlite3.Row]:
    """Decisions by part id, by lot (and wafer), or by model (and version), oldest first."""
    where, values = [], []
    for column, value in (("part_id", part), ("lot", lot), ("wafer", wafer), ("model_name", model),
                          ("model_version", version)):
        if value is not None:
            where.append(f"{column} = ?")
            values.append(value)
    if not where:
        raise ValueError("audit: give --part, --lot (and --wafer) or --model (and --version)")
    return db.execute(f"SELECT {', '.join(AUDIT_COLUMNS)} FROM decisions WHERE {' AND '.join(where)} "
                      f"ORDER BY time, rowid LIMIT ?", (*values, limit)).fetchall()


def where_version_ran(db: sqlite3.Connection, model: str, version: str | None) -> list[sqlite3.Row]:
    """Per (version, agent, tester): decisions, first and last time: where a version ran."""
    clause, values = ("model_name = ?", [model]) if version is None else ("model_name = ? AND model_version = ?",
                                                                         [model, version])
    return db.execute(f"SELECT model_version, agent_id, tester, count(*) AS parts, min(time) AS first, "
                      f"max(time) AS last FROM decisions WHERE {clause} GROUP BY model_version, agent_id, tester "
                      f"ORDER BY model_version, agent_id", values).fetchall()
