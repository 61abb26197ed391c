"""User-facing errors: one line that names the problem and the fix (the CLI prints it without a traceback)."""


class GraphoptError(Exception):
    """A problem with the user's input or environment, phrased for the user."""


class PassFailure(GraphoptError):
    """A pass raised or broke its tolerance; `report` says which and by how much."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}
