"""Errors a user can fix; they exit with code 2 and one message naming the fix."""


class ConfigError(Exception):
    """Bad configuration or input, found before any work starts."""

    exit_code = 2

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}")
        self.problem = problem
        self.fix = fix
