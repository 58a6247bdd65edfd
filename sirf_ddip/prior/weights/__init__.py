"""Shipped default prior weights (safetensors + card.json)."""
