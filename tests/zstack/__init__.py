"""ZStack wire compatibility (``/zstack/api/``): a client written from API.md and tests over it."""
