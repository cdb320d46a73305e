"""Where settings come from: variables named ``BLOCKVAULT_<NAME>``, and a ``.env`` file in the
working folder. Read by :mod:`shared.config` (one value, fast) and
:mod:`shared.settings_model` (all of them, typed)."""

ENV_PREFIX = "BLOCKVAULT_"
ENV_FILE = ".env"
