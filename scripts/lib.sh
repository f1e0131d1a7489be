# Sourced by the scripts beside it: install only what is missing or stale.
# A stamp records a hash of the files that decide an install; the install
# runs again only when they change (or the venv or node_modules is gone).

_hash() { cat "$@" | sha256sum | cut -d' ' -f1; }

# ensure_venv EXTRAS: .venv with saiproxy installed (editable) with EXTRAS
# ("" for none, "test", "fast"). Any install covers the base package.
ensure_venv() {
  local extras=$1 stamps=.venv/.stamps want
  want=$(_hash setup.cfg pyproject.toml)
  if [ -x .venv/bin/python ]; then
    if [ -z "$extras" ] && grep -qxF "$want" "$stamps"/* 2>/dev/null; then return; fi
    if grep -qxF "$want" "$stamps/${extras:-base}" 2>/dev/null; then return; fi
  fi
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
  mkdir -p "$stamps"
  echo "$want" > "$stamps/${extras:-base}"
}

# ensure_node_clients: the Node clients the tests drive, as pinned in tests/node.
ensure_node_clients() {
  local stamp=tests/node/node_modules/.stamp want
  want=$(_hash tests/node/package.json tests/node/package-lock.json)
  if grep -qxF "$want" "$stamp" 2>/dev/null; then return; fi
  npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
  echo "$want" > "$stamp"
}
