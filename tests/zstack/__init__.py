"""ZStack wire compatibility (``/zstack/api/``): a client written from docs/api.md and tests over it."""
