"""``python -m api.cli``: the ``blockvault`` command."""

from api.cli import main

main()
