"""Model servers: the exo client, the router over endpoints, the cache, the embedded model."""
