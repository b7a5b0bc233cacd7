"""The HTTP API: one module per resource, mounted once under /api/mission-control."""
