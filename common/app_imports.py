"""One lock around importing the Flower apps' module graphs.

Why: `flwr run` in simulation mode loads the ClientApp in the simulation's main thread while the
ServerApp runs in another thread, and the ServerApp of a simulation imports the client side too
(server.simulate). Two threads importing overlapping module graphs in different orders can hit
Python's import deadlock detection, which hands one of them a partially initialised module
("partially initialized module 'client.client_app' has no attribute 'app'"). Importing under
one re-entrant lock makes the order deterministic. Deployment processes load one app each and
never contend.
"""

from __future__ import annotations

import threading

APP_IMPORT_LOCK = threading.RLock()
