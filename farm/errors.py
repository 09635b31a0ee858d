"""One small error hierarchy. Every message says what is wrong and what to do."""


class FarmError(Exception):
    """Base of every error farm raises on purpose."""


class SpecError(FarmError):
    """A sweep file is invalid. Holds one message per problem."""

    def __init__(self, problems: list[str], source: str = "sweep"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n{lines}")


class ModelError(FarmError):
    """A base model cannot be found or loaded."""


class StageError(FarmError):
    """A stage of the grid failed."""


class ToolError(FarmError):
    """An external tool (converter, quantizer, service) is missing or failed."""
