#!/bin/sh
# Build the throwaway coldec extension in place (coldec*.so, git-ignored). Uses the project's venv Python.
set -eu
cd "$(dirname "$0")"
PY=${PYTHON:-../../.venv/bin/python}
INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
gcc -O2 -shared -fPIC -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers \
    -I"$INC" coldec.c -o "coldec$SUFFIX"
echo "built $(pwd)/coldec$SUFFIX"
