"""blockvault's entry points for people: the ``blockvault`` command (and later the REST API)."""
