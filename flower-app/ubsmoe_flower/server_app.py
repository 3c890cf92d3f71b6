"""ServerApp: runs the project's round loop (``ubsmoe.runner.run_experiment``) on the SuperLink's Grid."""

from ubsmoe.apps.flower_server import make_server_app

app = make_server_app()
