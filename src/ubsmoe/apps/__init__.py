"""Entry points that host a run elsewhere: the Flower ServerApp and ClientApp (``flower-app/`` loads them)."""
