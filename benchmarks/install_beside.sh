#!/usr/bin/env bash
# Does `pip install '.[EXTRA]'` leave a user's stack alone? A fresh venv gets torch 2.13.0,
# pytest and PACKAGE==VERSION first; then sigreg[EXTRA] (not editable) from this checkout;
# `pip freeze` before and after are compared, and the extra's integration tests run there
# against the installed sigreg. Everything goes to stdout (a log with date, commit, versions).
#
#   bash benchmarks/install_beside.sh transformers transformers 5.24.0 [VENV_DIR]
#   bash benchmarks/install_beside.sh lightning lightning 2.6.6
set -euo pipefail
extra=$1 package=$2 version=$3
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${4:-$(mktemp -d)/venv}
python=${PYTHON:-python3}

echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit: $(git -C "$root" rev-parse HEAD)$(git -C "$root" diff --quiet HEAD -- . ':!benchmarks' || echo ' (dirty)')"
echo "python: $($python --version 2>&1), venv: $venv (no system site-packages)"
$python -m venv "$venv"
pip() {  # without the lines about missing local index folders of this machine's pip config
  "$venv/bin/python" -m pip --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2)
}
echo "\$ pip install -q torch==2.13.0 pytest $package==$version"
pip install -q torch==2.13.0 pytest "$package==$version"
pip freeze --exclude-editable | sort > "$venv/freeze-before.txt"
echo "\$ pip install -q '$root[$extra]'"
pip install -q "$root[$extra]"
pip freeze --exclude-editable | sort > "$venv/freeze-after.txt"
echo "pip freeze, before -> after (- removed or changed, + added or changed):"
changes=$(diff "$venv/freeze-before.txt" "$venv/freeze-after.txt" | grep '^[<>]' || true)
echo "${changes:-  (no change)}" | sed 's/^</  -/; s/^>/  +/'
for name in torch "$package"; do
  before=$(grep -i "^$name==" "$venv/freeze-before.txt" || true)
  after=$(grep -i "^$name==" "$venv/freeze-after.txt" || true)
  echo "$name: $before -> $after $([ "$before" = "$after" ] && echo unchanged || echo CHANGED)"
done
echo "\$ python -m pytest -q -p no:cacheprovider tests/test_integration_$extra.py  (cwd: a copy of tests/)"
work=$(mktemp -d)
cp -r "$root/tests" "$work/tests"  # not the checkout, so `sigreg` is the installed one
cd "$work"
"$venv/bin/python" -c "import sigreg; print('sigreg from', sigreg.__file__)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider -p no:logging "tests/test_integration_$extra.py" 2>&1 | tail -3
