"""``python -m stepsaver.cli``: the same app as the ``stepsaver`` script (the load test starts the server so)."""

from stepsaver.cli import app

app()
