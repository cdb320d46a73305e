"""The chunk repository: blockvault's backup engine.

Vocabulary:
- *repository*: one backup storage's objects (config, keys, chunks, manifests, locks) on a
  *backend* (a folder, a storage-server, an S3 bucket).
- *chunk*: a fixed-size, aligned piece of a volume (4 MiB), stored once, named by its BLAKE3
  *digest*, compressed with zstd and optionally sealed with AES-256-GCM.
- *manifest*: one backup: the volume's size and every chunk's digest in order (None for zeros
  and holes); its digest is the backup's *id*, ``zstore://<repository id>/<id>`` its installPath.
- *parent*: the backup an incremental one reads changes against (by rehash or dirty bitmap).
"""
