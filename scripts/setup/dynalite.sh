# dynalite (a DynamoDB implementation on LevelDB) from the npm registry, into a cache dir
# outside the repo; the tests start their own dynalite processes (tests/backends/dynamodb.py
# looks in the same place, or at QQ_DYNALITE_BIN). Needs Node.js and npm
# (installed from Debian's packages when missing).
QQ_DYNALITE_VERSION=4.0.0
QQ_DYNALITE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/quorum-quest/dynalite-$QQ_DYNALITE_VERSION"
export QQ_DYNALITE_BIN="$QQ_DYNALITE_DIR/node_modules/.bin/dynalite"
if [ ! -x "$QQ_DYNALITE_BIN" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      nodejs npm >/dev/null
  fi
  mkdir -p "$QQ_DYNALITE_DIR"
  npm install --prefix "$QQ_DYNALITE_DIR" --no-audit --no-fund --save-exact --loglevel=error \
    "dynalite@$QQ_DYNALITE_VERSION" >/dev/null
fi
