"""User-facing errors.

A `KtxError` carries one line for a person: the file or tensor, the problem, what to do next.
The CLI prints it without a traceback and exits non-zero; the notebook API lets it propagate.
"""


class KtxError(Exception):
    """An error the user can act on (bad file, unsupported type, model does not fit...)."""
