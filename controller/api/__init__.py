"""The HTTP API: routes, the OpenAI-compatible front, status, metrics and the dashboard."""
