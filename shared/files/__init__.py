"""File-level restore: directories and files inside a volume backup, read without restoring
the volume and without mounting anything on the host.

Vocabulary:
- *device*: a byte range that reads like a disk (the backup exported over NBD, a partition of
  it, an LVM logical volume); devices.py.
- *partition*: one place a filesystem may live: a partition of an MBR or GPT table, an LVM
  logical volume, or the whole volume when it has no table; numbered from 0 in the order they
  are found (partitions in table order, each LVM physical volume's logical volumes in place).
- *filesystem*: what reads one partition: The Sleuth Kit (pytsk3) for ext2/3/4, FAT and NTFS,
  libyal's libfsxfs for XFS; filesystems.py. Paths are resolved inside the filesystem as in a
  chroot: a symbolic link is listed as one, and followed only within the filesystem.

The parsing runs in a sandboxed child process (child.py: resource limits, no privileges, no
settings or secrets) that reads the backup through the engine's NBD export; browse.py is the
parent's side (timeouts, size limits, paging).
"""
