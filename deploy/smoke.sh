#!/usr/bin/env bash
# A whole deployment on this machine, over loopback with the production security: certificates
# from deploy/certs/generate.sh, `fedldm coordinator start` (SuperLink behind the Fleet-only
# TLS proxy), two registered sites (`fedldm site init` + `site start`: SuperNodes with TLS and
# node authentication, each on its own demo data), then a tiny `fedldm coordinator run`.
# site-a allows the end-of-run evaluation, so utility is measured at the sites.
#
#   bash deploy/smoke.sh [--volumes] [WORK_DIR]
#
# --volumes runs the same on NIfTI head volumes (`fedldm demo-data --volumes`, a 3D run with
# `--set model.spatial_dims=3`). Checks that the run finished, wrote its report and synthetic
# set (NIfTI for volumes), measured utility at the site that allows it, and that each site's
# own ledger holds the run's charges within its budget.
# Takes ~3 minutes on 2 cores. Needs openssl. Uses the repository's .venv (`make install`).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
F="$REPO/.venv/bin/fedldm"
PY="$REPO/.venv/bin/python"
VOLUMES=""
if [ "${1:-}" = "--volumes" ]; then VOLUMES=1; shift; fi
W=${1:-$(mktemp -d)}
[ -x "$F" ] || { echo "smoke: $F missing; run 'make install' first" >&2; exit 2; }
rm -rf "$W/certs" "$W/data" "$W/link" "$W/state" "$W/runs" "$W/logs"
mkdir -p "$W/logs"
W=$(cd "$W" && pwd)
cd "$W"
port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

bash "$REPO/deploy/certs/generate.sh" --out certs --sites site-a,site-b > logs/certs.log 2>&1
i=0
for s in site-a site-b; do
  i=$((i + 1))
  if [ -n "$VOLUMES" ]; then
    "$F" demo-data --volumes --out "data/$s" --patients 40 --sites 2 --image-size 16 --seed $i
  else
    "$F" demo-data --out "data/$s" --patients 24 --slices 3 --sites 2 --image-size 16 --seed $i
  fi > "logs/data-$s.log" 2>&1
done

PORT=$(port); LPORT=$(port)
"$F" coordinator start --host 127.0.0.1 --port "$PORT" --local-port "$LPORT" \
  --state-dir link --certs certs > logs/link.log 2>&1 &
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
up=""
for _ in $(seq 90); do
  if (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then up=1; break; fi
  sleep 1
done
[ -n "$up" ] || { echo "smoke: the coordinator did not listen on $PORT in 90 s:" >&2
                  tail -20 logs/link.log >&2; exit 1; }
CONN=(--superlink "127.0.0.1:$LPORT" --certs certs)
for s in site-a site-b; do
  "$F" coordinator register-site "certs/sites/$s/auth.key.pub" "${CONN[@]}" --name "$s"
  "$F" site init --state-dir "state/$s" --site-id "$s" --epsilon 8 --delta 1e-5
  extra=()
  [ "$s" = site-a ] && extra=(--allow-evaluate)
  "$F" site start --superlink "127.0.0.1:$PORT" --data "data/$s" --state-dir "state/$s" \
    --site-id "$s" --root-certificates certs/ca.crt --auth-key "certs/sites/$s/auth.key" \
    --epsilon 8 --delta 1e-5 --port "$(port)" ${extra[@]+"${extra[@]}"} > "logs/$s.log" 2>&1 &
done

dims=()
[ -n "$VOLUMES" ] && dims=(--set model.spatial_dims=3)
start=$(date +%s)
"$F" coordinator run "${CONN[@]}" --out runs/smoke --preset tiny --image-size 16 ${dims[@]+"${dims[@]}"} \
  --set autoencoder.rounds=1 --set diffusion.rounds=1 --min-sites 2 --wait-for-sites 120 \
  --timeout 900 > logs/run.log 2>&1 || { tail -40 logs/run.log >&2; exit 1; }

"$PY" - "$W/runs/smoke" "${VOLUMES:-0}" "$W/state" <<'PYEOF'
import json, sys
from pathlib import Path
run, volumes, state = Path(sys.argv[1]), sys.argv[2] == "1", Path(sys.argv[3])
m = json.loads((run / "metrics.json").read_text())
assert (run / "report.html").is_file() and (run / "checkpoints" / "final").is_dir()
rows = (run / "synthetic" / "manifest.csv").read_text().splitlines()
suffix = ".nii.gz" if volumes else ".png"
assert len(rows) > 1 and rows[1].split(",")[0].endswith(suffix), rows[:2]
assert m["config"]["model"]["spatial_dims"] == (3 if volumes else 2)
u = m["utility"]
assert u["measured_at"] == "sites" and u["sites"] == ["site-a"], u
assert set(m["privacy"]["sites"]) == {"site-a", "site-b"}, m["privacy"]["sites"]
run_name = json.loads((run / "checkpoints" / "state.json").read_text())["run_name"]
for site, s in m["privacy"]["sites"].items():
    assert 0 < s["epsilon"] <= s["budget_epsilon"] + 1e-9, (site, s)
    # the site's own ledger, not the coordinator's view of it
    ledger = json.loads((state / site / "ledger.json").read_text())
    phases = {e["phase"] for e in ledger["entries"] if e["run_id"] == run_name}
    assert {"autoencoder", "diffusion"} <= phases, (site, phases)
    assert ("evaluate" in phases) == (site == "site-a"), (site, phases)
print(f"smoke: {'3D' if volumes else '2D'} deployment ok: TSTR AUC {u['tstr_auc']:.3f}, "
      f"TRTR AUC {u['trtr_auc']:.3f} at site-a; epsilon "
      + ", ".join(f"{k} {v['epsilon']:.2f}" for k, v in sorted(m["privacy"]["sites"].items())))
PYEOF
echo "smoke: $(( $(date +%s) - start )) s for the run; logs in $W/logs"
