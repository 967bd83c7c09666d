"""The collector's SQLite store: schema, durable writes, deduplication by (agent, stream, seq).

Schema and how to read it: SCHEMA.md beside this file. Durability: WAL journal with ``synchronous=FULL``,
so a committed transaction is on disk when ``commit`` returns; the server acknowledges a window only
after that. Per-test arrays (counts, PSI, ...) are stored as msgpack BLOBs, one row per (window, site).
"""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import EdgeError
from ..wire.codec import decode_trusted, encode
from ..wire.stats import StatsWindow

SCHEMA_VERSION = 2        # 2: baselines, incidents, incident_tests (a version 1 database gains them when opened)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    checksum TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL,
    columns BLOB NOT NULL, bins INTEGER NOT NULL, expected_outlier_rate REAL NOT NULL,
    reference BLOB NOT NULL, first_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY, tester TEXT NOT NULL, stream TEXT NOT NULL, last_seq INTEGER NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, windows INTEGER NOT NULL,
    model_checksum TEXT NOT NULL REFERENCES models(checksum),
    dropped_total INTEGER NOT NULL, unspooled_lost INTEGER NOT NULL, silent_since REAL);
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY, agent_id TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL,
    tester TEXT NOT NULL, model_checksum TEXT NOT NULL REFERENCES models(checksum),
    start REAL NOT NULL, end REAL NOT NULL, closed_by TEXT NOT NULL, parts INTEGER NOT NULL,
    unobserved_parts INTEGER NOT NULL, received_at REAL NOT NULL, dropped_total INTEGER NOT NULL,
    UNIQUE (agent_id, stream, seq));
CREATE INDEX IF NOT EXISTS windows_by_end ON windows (end);
CREATE TABLE IF NOT EXISTS site_windows (
    window_id INTEGER NOT NULL REFERENCES windows(id), head INTEGER NOT NULL, site INTEGER NOT NULL,
    parts INTEGER NOT NULL, outliers INTEGER NOT NULL, outlier_rate REAL,
    max_psi REAL, max_psi_test INTEGER, score_psi REAL,
    change_fired INTEGER NOT NULL, change_fires INTEGER NOT NULL, change_statistic REAL NOT NULL,
    missing BLOB NOT NULL, counts BLOB NOT NULL, psi BLOB NOT NULL, js BLOB NOT NULL, ks BLOB NOT NULL,
    score_counts BLOB NOT NULL,
    PRIMARY KEY (window_id, head, site));
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY, created_at REAL NOT NULL, kind TEXT NOT NULL, agent_id TEXT, tester TEXT,
    head INTEGER, site INTEGER, test TEXT, model TEXT, value REAL, threshold REAL, sample_size INTEGER,
    window_id INTEGER REFERENCES windows(id), message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS alerts_by_time ON alerts (created_at);
CREATE TABLE IF NOT EXISTS baselines (
    agent_id TEXT NOT NULL, model_checksum TEXT NOT NULL REFERENCES models(checksum), head INTEGER NOT NULL,
    site INTEGER NOT NULL, counts BLOB NOT NULL, score_counts BLOB NOT NULL, parts REAL NOT NULL,
    outliers REAL NOT NULL, updated_at REAL NOT NULL, judged_psi BLOB NOT NULL, judged_end REAL NOT NULL,
    PRIMARY KEY (agent_id, model_checksum, head, site));
CREATE TABLE IF NOT EXISTS incidents (
    id INTEGER PRIMARY KEY, model_checksum TEXT NOT NULL REFERENCES models(checksum), model TEXT NOT NULL,
    scope TEXT NOT NULL, diagnosis TEXT NOT NULL, status TEXT NOT NULL, agent_id TEXT, tester TEXT, head INTEGER,
    site INTEGER, members BLOB NOT NULL, start REAL NOT NULL, end REAL NOT NULL, opened_at REAL NOT NULL,
    updated_at REAL NOT NULL, closed_at REAL, closed_because TEXT, opened_window_id INTEGER REFERENCES windows(id),
    last_window_id INTEGER REFERENCES windows(id), blocks INTEGER NOT NULL, parts INTEGER NOT NULL,
    others_held INTEGER, retrain INTEGER NOT NULL, recommendation TEXT NOT NULL, score_psi REAL, score_noise REAL,
    outlier_rate REAL, baseline_outlier_rate REAL, summary TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS incidents_by_status ON incidents (status, opened_at);
CREATE TABLE IF NOT EXISTS incident_tests (
    incident_id INTEGER NOT NULL REFERENCES incidents(id), test TEXT NOT NULL, psi REAL, psi_peak REAL,
    noise REAL, n INTEGER NOT NULL, n_baseline INTEGER NOT NULL, psi_siblings REAL, psi_fleet REAL,
    psi_reference REAL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    PRIMARY KEY (incident_id, test));
"""
INCIDENT_COLUMNS = ("model_checksum", "model", "scope", "diagnosis", "status", "agent_id", "tester", "head", "site",
                    "members", "start", "end", "opened_at", "updated_at", "closed_at", "closed_because",
                    "opened_window_id", "last_window_id", "blocks", "parts", "others_held", "retrain",
                    "recommendation", "score_psi", "score_noise", "outlier_rate", "baseline_outlier_rate", "summary")


class StoreError(EdgeError):
    """The database cannot be opened or written (names the file)."""


# ---- the database --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Added:
    window_id: int
    previous: sqlite3.Row | None      # the agent's row before this window (None: first window ever)


class Store:
    """One SQLite connection, used by one thread (the collector's receive loop, or the report)."""

    def __init__(self, path: str | Path, *, read_only: bool = False):
        self.path = Path(path)
        if read_only and not self.path.exists():
            raise StoreError(f"{self.path}: no such database")
        try:
            uri = f"file:{self.path}?mode=ro" if read_only else str(self.path)
            self.db = sqlite3.connect(uri, uri=read_only, isolation_level=None, timeout=30.0)
            self.db.row_factory = sqlite3.Row
            if not read_only:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(SCHEMA)
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                # Version 1 lacks only tables, which SCHEMA has just created.
                self.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version' AND value = '1'",
                                (str(SCHEMA_VERSION),))
            version = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as error:
            raise StoreError(f"{self.path}: cannot be used as the stats database ({error})") from None
        if version is None or int(version[0]) != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {None if version is None else version[0]}, this "
                             f"collector reads version {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (durable on return), ROLLBACK on any exception."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def add_window(self, window: StatsWindow, received_at: float) -> Added | None:
        """Insert a window (inside a transaction); None if (agent, stream, seq) is stored already."""
        m = window.message
        agent_id, stream, seq = window.key
        previous = self.db.execute("SELECT * FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
        if self.db.execute("SELECT 1 FROM windows WHERE agent_id = ? AND stream = ? AND seq = ?",
                           (agent_id, stream, seq)).fetchone():
            self.db.execute("UPDATE agents SET last_seen = ?, silent_since = NULL WHERE agent_id = ?",
                            (received_at, agent_id))
            return None
        model = m["model"]
        self.db.execute("INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (model["checksum"], model["name"], model["version"], encode(m["columns"]), m["bins"],
                         m["expected_outlier_rate"], encode(m["reference"]), received_at))
        w, spool = m["window"], m["spool"]
        cursor = self.db.execute(
            "INSERT INTO windows (agent_id, stream, seq, tester, model_checksum, start, end, closed_by, parts, "
            "unobserved_parts, received_at, dropped_total) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (agent_id, stream, seq, m["tester"], model["checksum"], w["start"], w["end"], w["closed_by"], w["parts"],
             w["unobserved_parts"], received_at, spool["dropped_total"]))
        window_id = cursor.lastrowid
        for site in m["sites"]:
            psi = site["psi"]
            defined = [(value, t) for t, value in enumerate(psi) if value is not None]
            max_psi, max_test = max(defined) if defined else (None, None)
            self.db.execute(
                "INSERT INTO site_windows VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (window_id, site["head"], site["site"], site["parts"], site["outliers"], site.get("outlier_rate"),
                 max_psi, max_test, site.get("score_psi"), int(site["change"]["fired"]), site["change"]["fires"],
                 site["change"]["statistic"], encode(site["missing"]), encode(site["counts"]), encode(psi),
                 encode(site["js"]), encode(site["ks"]), encode(site["score_counts"])))
        self.db.execute(
            "INSERT INTO agents VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, NULL) ON CONFLICT (agent_id) DO UPDATE SET "
            "tester = excluded.tester, stream = excluded.stream, "
            "last_seq = CASE WHEN agents.stream = excluded.stream THEN max(agents.last_seq, excluded.last_seq) "
            "ELSE excluded.last_seq END, last_seen = excluded.last_seen, windows = agents.windows + 1, "
            "model_checksum = excluded.model_checksum, dropped_total = excluded.dropped_total, "
            "unspooled_lost = excluded.unspooled_lost, silent_since = NULL",
            (agent_id, m["tester"], stream, seq, received_at, received_at, model["checksum"], spool["dropped_total"],
             spool["unspooled_lost"]))
        return Added(window_id, previous)

    def add_alert(self, alert: dict) -> None:
        self.db.execute(
            "INSERT INTO alerts (created_at, kind, agent_id, tester, head, site, test, model, value, threshold, "
            "sample_size, window_id, message) VALUES (:created_at, :kind, :agent_id, :tester, :head, :site, :test, "
            ":model, :value, :threshold, :sample_size, :window_id, :message)", alert)

    def mark_silent(self, agent_id: str, since: float) -> None:
        self.db.execute("UPDATE agents SET silent_since = ? WHERE agent_id = ?", (since, agent_id))

    def agents(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM agents ORDER BY agent_id").fetchall()

    def last_alert_times(self) -> dict[tuple, float]:
        """Latest time of each alert key (kind, agent, head, site, test): repeats are suppressed from it."""
        rows = self.db.execute("SELECT kind, agent_id, head, site, test, max(created_at) FROM alerts "
                               "GROUP BY kind, agent_id, head, site, test").fetchall()
        return {tuple(row[:5]): row[5] for row in rows}

    # ---- baselines and incidents (incidents.py) -------------------------------------------------------------------

    def save_baseline(self, key: tuple[str, str, int, int], counts, score_counts, parts: float, outliers: float,
                      now: float, judged_psi: list, judged_end: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO baselines VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (*key, encode(counts.tolist()), encode(score_counts.tolist()), parts, outliers, now,
                         encode(judged_psi), judged_end))

    def baselines(self) -> dict[tuple[str, str, int, int], tuple]:
        """(agent, model checksum, head, site) -> (counts [T, bins], score counts, parts, outliers)."""
        return {(row["agent_id"], row["model_checksum"], row["head"], row["site"]):
                (np.array(decode_trusted(row["counts"]), dtype=np.float64),
                 np.array(decode_trusted(row["score_counts"]), dtype=np.float64), row["parts"], row["outliers"])
                for row in self.db.execute("SELECT * FROM baselines")}

    def save_incident(self, row: dict) -> int:
        """Insert (``row["id"]`` None) or update an incident; its id."""
        if row["id"] is None:
            cursor = self.db.execute(f"INSERT INTO incidents ({', '.join(INCIDENT_COLUMNS)}) VALUES "
                                     f"({', '.join(':' + c for c in INCIDENT_COLUMNS)})", row)
            return cursor.lastrowid
        self.db.execute(f"UPDATE incidents SET {', '.join(f'{c} = :{c}' for c in INCIDENT_COLUMNS)} WHERE id = :id",
                        row)
        return row["id"]

    def save_incident_test(self, incident_id: int, test: str, evidence: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO incident_tests VALUES (:incident_id, :test, :psi, :psi_peak, :noise, "
                        ":n, :n_baseline, :psi_siblings, :psi_fleet, :psi_reference, :first_seen, :last_seen)",
                        {**evidence, "incident_id": incident_id, "test": test})

    def judged_psi(self) -> dict[tuple[str, str, int, int], tuple[list, float]]:
        """(agent, model checksum, head, site) -> PSI per test of the latest judged block against the baseline it
        was judged with (None: not judged), and that block's end."""
        return {(row[0], row[1], row[2], row[3]): (decode_trusted(row[4]), row[5]) for row in
                self.db.execute("SELECT agent_id, model_checksum, head, site, judged_psi, judged_end FROM baselines")}

    def open_incidents(self) -> list[tuple[sqlite3.Row, list[sqlite3.Row]]]:
        return [(row, self.db.execute("SELECT * FROM incident_tests WHERE incident_id = ?", (row["id"],)).fetchall())
                for row in self.db.execute("SELECT * FROM incidents WHERE status = 'open' ORDER BY id").fetchall()]
