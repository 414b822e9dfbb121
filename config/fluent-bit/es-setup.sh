#!/bin/sh
# Installs the audit ILM policy and index template in Elasticsearch (idempotent PUTs).
# Run by the compose service elasticsearch-setup, or by hand with the same variables.
# The password comes from a file (ELASTICSEARCH_PASSWORD_FILE), and reaches curl on its
# standard input (-K -), never on a command line that `ps` shows.
set -eu
: "${ELASTICSEARCH_URL:?}" "${ELASTICSEARCH_USER:?}"
password_file="${ELASTICSEARCH_PASSWORD_FILE:-/run/secrets/elasticsearch/password}"
[ -s "$password_file" ] || { echo "es-setup: $password_file is missing or empty" >&2; exit 1; }
dir="$(dirname "$0")"
put() {
  printf 'user = "%s:%s"\n' "$ELASTICSEARCH_USER" "$(cat "$password_file")" |
  curl -K - --fail-with-body --silent --show-error --retry 10 --retry-connrefused --retry-delay 5 \
       -H 'Content-Type: application/json' \
       -X PUT "$ELASTICSEARCH_URL/$1" --data-binary "@$dir/$2"
  echo
}
put _ilm/policy/seekgate-audit-180d es-ilm-policy.json
put _index_template/seekgate-audit es-index-template.json
