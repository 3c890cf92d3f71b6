"""UB-SMoE's Flower App: the ServerApp and ClientApp live in the installed ``ubsmoe`` package."""
