"""Notifications: telling a person what went wrong while nobody watched (docs/notifications.md).

- An *event* is one thing that happened (a job failed, a host went Disconnected, a verify
  found damage), recorded once in the catalog under a unique key (:mod:`.events`), whoever
  notices it first: the notification pass of a beat (:mod:`.conditions` looks at the catalog)
  or a caller of :func:`.events.notify_event`.
- A *rule* sends the events of one ``eventType`` to its *targets*; a *target* is a webhook (the
  body signed with HMAC-SHA256 under the target's secret) or an SMTP mailbox (:mod:`.targets`).
- A *delivery* is one message to one target: a digest of every event that arrived since the
  target's last message, sent at most once per ``throttleSeconds`` of the target; failed sends
  are retried with back-off, collecting newer events meanwhile (:mod:`.delivery`). The
  deliveries are the history of what was sent.

:func:`.delivery.run_pass` is the whole cycle (evaluate, dispatch, send); ``blockvault beat``
runs it every :data:`.delivery.PASS_SECONDS`.
"""
