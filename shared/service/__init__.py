"""The service: what the API and the workers do with the catalog and the engine, by concern.

Each action is two functions: ``request_<action>`` runs in the API (it checks everything that
can be checked at once — 400/404/409 — creates the rows and sends one API job) and
``run_<action>`` runs in a worker for that job (it calls the engine and records what it did).
:mod:`~shared.service.rows` holds the rows they share; :mod:`~shared.service.volume_backups`,
:mod:`~shared.service.copies`, :mod:`~shared.service.recovery`,
:mod:`~shared.service.deletion`, :mod:`~shared.service.database_backups` and
:mod:`~shared.service.scan` one concern each.
"""
