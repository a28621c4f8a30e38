"""Kowalski controller: discovery, routing, the RLM loop, batches and the dashboard."""
