#!/usr/bin/env bash
# Sets up .venv (first run only) and then runs the demo or the tests.
#   bash quickstart.sh demo [extra run.py flags]   # builds the synthetic scenes, trains Joint and Auxi-all
#   bash quickstart.sh test [extra pytest args]    # the test suite
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv
stamp=$venv/.installed-$(sha1sum setup.cfg setup.py pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e '.[test]'
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
py=$venv/bin/python
what=${1:-}
shift || true
case "$what" in
  demo) exec "$py" run.py --config=configs/synthetic_three_task.py --workdir=workdirs/demo "$@" ;;
  test) exec "$py" -m pytest -n 2 --dist loadfile --no-loadscope-reorder tests "$@" ;;
  *) echo "usage: bash quickstart.sh demo|test [args...]" >&2; exit 2 ;;
esac
