from __future__ import annotations


class KdError(Exception):
    """A problem the user can fix. Its message is one sentence that names the bad value and what to do."""

    def __str__(self) -> str:
        text = super().__str__()
        # A DataLoader worker's exception is re-raised in the main process as type(text) with the worker's
        # traceback folded into the text; the sentence is its last line.
        if "Original Traceback" in text:
            return text.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        return text


class NonFiniteError(KdError):
    """The loss or the weights became NaN or infinite: the run stops and its last good checkpoint is kept."""


class WriteError(KdError):
    """A file could not be written (a full disk, a lost mount, no permission): the previous file is kept whole."""

    @classmethod
    def of(cls, path: object, what: str, error: BaseException) -> WriteError:
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[-1][:120]
        return cls(
            f"could not write the {what} {path} ({reason}); free space there or choose another folder, and run "
            "again (the previous file, if any, is kept whole)"
        )
