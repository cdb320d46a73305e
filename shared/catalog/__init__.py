"""The catalog: what blockvault knows of hosts, VMs, volumes, backup storage, backups and schedules.

Rows are named as ZStack's inventories name them on the wire (camelCase attributes and
columns), so the query language maps a field name to a column with no translation table.
``state`` is administrative (Enabled/Disabled); ``status`` is the lifecycle (Creating, Ready,
Deleting, Failed, ...). Every row has ``createDate`` and ``lastOpDate``.
"""
