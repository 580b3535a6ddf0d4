"""Lazarus: checkpoint/restore of Linux processes, with lazy restore through userfaultfd."""

__version__ = "0.1.0"
