"""ClientApp: trains the client this SuperNode holds (``--node-config client-id=N``) with ``train_client``."""

from ubsmoe.apps.flower_client import make_client_app

app = make_client_app()
