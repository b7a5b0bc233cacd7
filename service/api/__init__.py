"""The HTTP API: one module per resource, each a list of ROUTES, mounted once under API_PREFIX."""

API_PREFIX = "/api/mission-control"
"""Where the API's resources live; /healthz, /readyz, /metrics, /openapi.json and the dashboard are at the root."""
