#!/usr/bin/env bash
# What CI (.ci/run) runs for style and types, and what .pre-commit-config.yaml runs on commit:
#   ruff lint, ruff format check, configs/**/*.json formatted with indent 4 (model-zoo's pretty-format-json
#   with --no-sort-keys), mypy on cmml_monai (the settings in pyproject.toml).
# Every check runs; the exit status is 1 when any failed.
#   bash scripts/lint.sh         check only (CI)
#   bash scripts/lint.sh --fix   rewrite: ruff format, ruff's safe lint fixes, the JSON layout; then check
set -uo pipefail
cd "$(dirname "$0")/.."
fix=0
[[ "${1:-}" == "--fix" ]] && fix=1

json_format() {  # $1 = check | fix; the layout of pre-commit-hooks' pretty-format-json --indent=4 --no-sort-keys
    python - "$1" <<'PY'
import glob, json, sys

mode, bad = sys.argv[1], []
for path in sorted(glob.glob("configs/**/*.json", recursive=True)):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    pretty = json.dumps(json.loads(text, object_pairs_hook=dict), indent=4) + "\n"
    if text != pretty:
        bad.append(path)
        if mode == "fix":
            with open(path, "w", encoding="utf-8") as f:
                f.write(pretty)
for path in bad:
    print(f"{path}: {'reformatted' if mode == 'fix' else 'not formatted as json.dumps(indent=4)'}")
sys.exit(1 if bad and mode == "check" else 0)
PY
}

if [[ $fix == 1 ]]; then
    ruff check --fix . ; ruff format . ; json_format fix
fi

failed=()
echo "== ruff check";        ruff check --output-format concise .          || failed+=("ruff check")
echo "== ruff format";       ruff format --check --output-format concise . || failed+=("ruff format")
echo "== configs JSON";      json_format check       || failed+=("configs JSON (bash scripts/lint.sh --fix)")
echo "== mypy cmml_monai";   mypy                    || failed+=("mypy")
if (( ${#failed[@]} )); then
    echo "lint failed: ${failed[*]}"
    exit 1
fi
echo "lint passed"
