"""Errors the runtime raises for bad input: each names what is wrong and what to do."""


class FlexhelmError(Exception):
    """Base of every error flexhelm raises on purpose (the CLI prints these without a traceback)."""


class CheckpointError(FlexhelmError):
    """A checkpoint folder is missing, incomplete, corrupt or of an unsupported kind."""


class InputError(FlexhelmError, ValueError):
    """A request to the engine is malformed (empty, too long, out-of-range arguments)."""


class PolicyError(FlexhelmError, ValueError):
    """A policy is invalid or cannot run on this machine."""


class DiskFullError(FlexhelmError, OSError):
    """A write found no room (ENOSPC, EDQUOT, EFBIG): names the folder, the bytes it needed and those free."""


def disk_full(e: OSError, folder, needed: int | None = None) -> DiskFullError | None:
    """A `DiskFullError` for `e` if it is one of "no room" errors (else None), naming `folder`'s free space."""
    import errno
    import shutil

    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return None
    try:
        free = f"{shutil.disk_usage(folder).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    need = f"needed {needed:,} bytes, " if needed is not None else ""
    return DiskFullError(f"no room to write in {folder} ({e.strerror}: {need}{free}); free space there and "
                         "run the same command again: finished work is kept")
