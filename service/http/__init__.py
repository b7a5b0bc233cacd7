"""HTTP plumbing: errors and bodies, API keys and scopes, the middleware, rate limits, the OpenAPI
document, metrics, access logs, and the guards on uvicorn's protocol."""
