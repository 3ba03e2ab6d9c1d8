#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite (slow tests included), on the locked versions
# (requirements.lock, in .venv). Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow" -x
#
#   bash scripts/test.sh --latest [pytest args]
# runs the same suite in a separate environment, .venv-latest, built afresh each time from the
# newest releases the package index serves (the lock ignored; torch stays at setup.sh's pin),
# so that a release that breaks tokattr is found before users find it.
#   bash scripts/test.sh --lowest [pytest args]
# does the same on the lowest versions pyproject.toml admits (its floors), in .venv-lowest.
# Both print the versions they got and leave them in <venv>/freeze.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  --latest | --lowest)
    export TOKATTR_DEPS=${1#--} TOKATTR_VENV=.venv-${1#--}
    shift
    rm -rf "$TOKATTR_VENV"  # afresh: nothing kept from an earlier day's resolution
    ;;
esac
VENV=${TOKATTR_VENV:-.venv}
bash scripts/setup.sh || exit 1
if [ "${TOKATTR_DEPS:-lock}" != lock ]; then
  "$VENV/bin/python" -m pip freeze --exclude-editable > "$VENV/freeze.txt"
  echo "test.sh: ${TOKATTR_DEPS} versions in $VENV ($VENV/freeze.txt):" \
    $(grep -iE '^(torch|transformers|tokenizers|lightning|torchmetrics|captum|wandb|numpy)==' \
      "$VENV/freeze.txt")
fi
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
