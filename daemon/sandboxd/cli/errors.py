"""How a CLI command fails: a message for stderr and the process exit code."""

EXIT_INVALID = 2  # bad input: invalid spec, unknown pool, lease too long
EXIT_NO_DAEMON = 3  # `status`: no heartbeat
EXIT_NO_SANDBOX = 4  # claim: nothing ready within the wait
EXIT_EXEC_TIMEOUT = 124  # as timeout(1)
EXIT_INTERRUPTED = 130


class CliError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code
