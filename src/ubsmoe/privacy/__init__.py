"""Client-level differential privacy (DP-FedAvg): clipping and noising client updates, and the accountant.

:mod:`ubsmoe.privacy.dp` clips each client's whole update (trainable state change plus the
statistics it sends) and adds Gaussian noise to the averages; :mod:`ubsmoe.privacy.accountant`
turns the rounds run into epsilon with a maintained RDP accountant (``dp-accounting``).
docs/privacy.md lists what leaves a client in each method and how it is protected.
"""
