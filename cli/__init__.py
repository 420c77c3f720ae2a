"""The `fedldm` command line, one module per audience.

- `cli.site`: what a hospital runs (site check|init|start|budget);
- `cli.coordinator`: the consortium side of a deployment (coordinator start|register-site|...);
- `cli.local`: one-machine commands (simulate, evaluate, demo-data, pretrain-ae, pretrain-dm);
- `cli.args`: the shared argument types; `cli.errors`: the exit-code policy's error classes;
- `cli.main`: the one dispatch, `main(argv) -> int` (the `fedldm` console script).
"""
