"""The folder the workspaces live in, laid out so that creating and deleting thousands of them
stays cheap: it is marked as the top of a directory hierarchy (ext2/3/4's `T` attribute, what
`chattr +T` sets).

Why: ext4 puts a new directory in its parent's block group, so every workspace (its clone,
its .git) lands in the group of this one folder; and on ext4 without a journal the inode
allocator passes over every inode freed in the last minutes, reading each one's inode table
block to find out. A worker that deletes a workspace a run then pays, for every file of the
next clone, a scan over the thousands it just freed (measured on such a disk: the kernel's
`find_inode_bit`/`recently_deleted` were most of git's CPU). Under a folder marked `T`, each
workspace directory is placed as a top-level one would be (ext4's Orlov allocator: a group
with room), so the freed inodes spread over the whole disk and no group fills with them.
Filesystems without the attribute (tmpfs, overlayfs, xfs, btrfs) refuse it: nothing changes.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# <linux/fs.h>: the ioctls chattr uses. The kernel reads and writes an int, whatever the
# `long` in their definition says.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000
# What a filesystem (or a kernel, or a container without the capability) answers when it has
# no such attribute or does not let this process set it.
_NOT_SUPPORTED = {errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM, errno.EACCES}


def prepare_workspaces_dir(folder: Path) -> bool:
    """Creates folder if needed and marks it as the top of a directory hierarchy. Returns
    whether it is marked (False where the filesystem has no such attribute)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return _mark_as_hierarchy_top(folder)
    except OSError as exc:
        if exc.errno not in _NOT_SUPPORTED:
            raise
        log.info("workspaces folder %s: no top-of-hierarchy mark here (%s)", folder, exc)
        return False


def _mark_as_hierarchy_top(folder: Path) -> bool:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = _flags(fd)
        if not flags & _FS_TOPDIR_FL:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, array.array("i", [flags | _FS_TOPDIR_FL]))
        return True
    finally:
        os.close(fd)


def _flags(fd: int) -> int:
    buffer = array.array("i", [0])
    fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buffer, True)
    return buffer[0]
