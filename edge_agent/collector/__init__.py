"""The stats collector: receives drift windows from the fleet's agents, stores them, alerts, reports."""
