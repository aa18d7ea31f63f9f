"""The one exception type users see.

Anything a user can get wrong (a prompt, a path, a number) raises :class:`StepsaverError` with a
single line naming the problem and the fix; the CLI prints that line and exits with code 2
instead of showing a traceback from deep inside torch or diffusers.
"""


class StepsaverError(ValueError):
    """A user-facing error whose message is one line: what is wrong and how to fix it."""
