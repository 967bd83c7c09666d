"""The model package contract between the trainer (who writes packages) and the agent (who serves them):
typed manifest, registry store with stages and history, verification, file checksums, onnxruntime session
settings, and the reference rules (PAT, drift bins) both apply."""
