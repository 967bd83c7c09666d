"""Packages to controllers without a shared disk: the registry service (central) and the agent's follower."""
