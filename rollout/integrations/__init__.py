"""Adapters that let other RL frameworks drive the fleet (`tunix`: Tunix's rollout backend)."""
