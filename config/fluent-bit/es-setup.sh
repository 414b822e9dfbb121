#!/bin/sh
# Installs the audit ILM policy and index template in Elasticsearch (idempotent PUTs).
# Run by the compose service elasticsearch-setup, or by hand with the same variables.
set -eu
: "${ELASTICSEARCH_URL:?}" "${ELASTICSEARCH_USER:?}" "${ELASTICSEARCH_PASSWORD:?set ELASTICSEARCH_PASSWORD}"
dir="$(dirname "$0")"
put() {
  curl --fail-with-body --silent --show-error --retry 10 --retry-connrefused --retry-delay 5 \
       -u "$ELASTICSEARCH_USER:$ELASTICSEARCH_PASSWORD" -H 'Content-Type: application/json' \
       -X PUT "$ELASTICSEARCH_URL/$1" --data-binary "@$dir/$2"
  echo
}
put _ilm/policy/seekgate-audit-180d es-ilm-policy.json
put _index_template/seekgate-audit es-index-template.json
